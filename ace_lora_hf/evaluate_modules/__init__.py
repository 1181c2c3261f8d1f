"""`evaluate` modules of the package's metrics: `evaluate.load(metric_path("classification"), config_name=...)`."""

from pathlib import Path


def metric_path(name: str) -> str:
    """Local path of one of the package's `evaluate` modules (the Hub's stock metrics cannot be fetched offline)."""
    path = Path(__file__).parent / name / f"{name}.py"
    if not path.is_file():
        raise ValueError(f"No evaluate module {name!r} in ace_lora_hf; available: classification.")
    return str(path)


__all__ = ["metric_path"]
