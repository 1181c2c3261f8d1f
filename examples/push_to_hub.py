#!/usr/bin/env python
"""Assemble a complete Hub repository for an ACE-LoRA model and (optionally) upload it.

    python examples/push_to_hub.py --model converted/ --repo-id aydnarda/ACE-LoRA --staging hub_repo/ [--push]

The staging folder gets: config.json with auto_map, the self-contained code files, model.safetensors, the
processor and tokenizer files, hf_model_inference.py and a model card (README.md). Without --push it is only
written, to be inspected; with --push it is uploaded (needs `huggingface-cli login`).
"""

import argparse
import shutil
from pathlib import Path

from transformers import AutoModel, AutoProcessor

import ace_lora_hf  # noqa: F401  (registers the Auto classes)
from ace_lora_hf.model_card import BIOMEDCLIP, render_model_card


REPO_ROOT = Path(__file__).resolve().parents[1]


def stage_repository(model_dir: Path, repo_id: str, staging: Path, base_model: str = BIOMEDCLIP) -> Path:
    """Write everything the Hub repository holds into `staging` (which must be empty or absent)."""
    if staging.exists() and any(staging.iterdir()):
        raise SystemExit(f"{staging} is not empty; choose an empty --staging folder.")
    model = AutoModel.from_pretrained(model_dir)
    processor = AutoProcessor.from_pretrained(model_dir)
    model.save_pretrained(staging)
    processor.save_pretrained(staging)
    shutil.copy(REPO_ROOT / "hf_model_inference.py", staging / "hf_model_inference.py")
    (staging / "README.md").write_text(render_model_card(repo_id, base_model))
    return staging


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True, help="A converted or fine-tuned model folder.")
    parser.add_argument("--repo-id", required=True, help="Hub repository, e.g. aydnarda/ACE-LoRA.")
    parser.add_argument("--staging", type=Path, required=True, help="Empty folder to assemble the repository in.")
    parser.add_argument("--base-model", default=BIOMEDCLIP, help="Base model named in the card's metadata.")
    parser.add_argument("--push", action="store_true", help="Upload the staged folder to the Hub.")
    parser.add_argument("--private", action="store_true", help="Create the repository as private.")
    args = parser.parse_args(argv)
    staging = stage_repository(args.model, args.repo_id, args.staging, args.base_model)
    print(f"staged {args.repo_id} in {staging}: {', '.join(sorted(p.name for p in staging.iterdir()))}")
    if args.push:
        from huggingface_hub import HfApi

        api = HfApi()
        api.create_repo(args.repo_id, private=args.private, exist_ok=True)
        commit = api.upload_folder(folder_path=staging, repo_id=args.repo_id, commit_message="Upload ACE-LoRA")
        print(f"uploaded: {commit.commit_url}")


if __name__ == "__main__":
    main()
