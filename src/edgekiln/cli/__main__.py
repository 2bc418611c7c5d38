from edgekiln.cli.app import main

main()
