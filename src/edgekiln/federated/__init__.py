"""Federated fine-tuning with Flower: edgekiln's ClientApp and ServerApp and what surrounds them.

Data flow: ``partition`` (who holds which samples) -> ``client_app`` (local training, int8
update compression, Flower's clipping mod) -> ``strategy`` (Flower's FedAvg/FedProx and DP
wrapper, plus the recorder that measures traffic) -> ``server_app`` (rounds, centralized
evaluation) -> ``report`` (the run folder) -> ``loop`` (optimize, bundle, publish).
``simulation`` runs the apps on Flower's simulation engine, ``deployment`` packs them for
``flwr run`` against ``flower-superlink`` / ``flower-supernode``.

Importing this package imports nothing heavy; ``flwr`` is imported by the app modules only.
"""
