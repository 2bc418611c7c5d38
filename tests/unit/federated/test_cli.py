"""`edgekiln federate` rejects bad input with one line and exit code 2, before anything trains."""

from __future__ import annotations

import pytest

from edgekiln.cli.app import main


@pytest.mark.parametrize(("args", "needle"), [
    (["--partition", "shards:3"], "--partition 'shards:3'"),
    (["--clients", "0"], "--clients must be at least 1"),
    (["--compress", "int4"], "--compress 'int4'"),
    (["--dp-noise", "1.0"], "--dp-noise needs --dp-clip"),
    (["--publish", "http://127.0.0.1:9"], "--publish needs --recipe"),
    (["--recipe", "no-such-recipe.yaml"], "recipe file not found"),
])
def test_bad_flags_exit_2_with_one_line(args, needle, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["federate", "--out", str(tmp_path / "run"), "--quiet", *args])
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2, err
    assert needle in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "run").exists()


def test_flower_app_flag_writes_the_app_for_flwr_run_and_trains_nothing(tmp_path, capsys):
    import tomllib

    main(["federate", "--clients", "4", "--rounds", "3", "--partition", "iid", "--compress", "int8",
          "--out", str(tmp_path / "run"), "--flower-app", str(tmp_path / "app")])
    config = tomllib.loads((tmp_path / "app" / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    assert (config["edgekiln-clients"], config["edgekiln-rounds"], config["edgekiln-compress"]) == (4, 3, "int8")
    assert "num-partitions=4" in capsys.readouterr().out
    assert not (tmp_path / "run").exists()
