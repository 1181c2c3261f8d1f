"""`evaluate` modules of the package's metrics: `evaluate.load(metric_path(name))`, name one of `MODULES`."""

from pathlib import Path


MODULES = ("classification", "segmentation_dice", "detection_map")


def metric_path(name: str) -> str:
    """Local path of one of the package's `evaluate` modules (the Hub's stock metrics cannot be fetched offline)."""
    path = Path(__file__).parent / name / f"{name}.py"
    if not path.is_file():
        raise ValueError(f"No evaluate module {name!r} in ace_lora_hf; available: {', '.join(MODULES)}.")
    return str(path)


__all__ = ["MODULES", "metric_path"]
