"""Where a model comes from: a folder or Hub repository in ACE-LoRA's transformers format, or the released model built
from BiomedCLIP and the authors' adapters and kept, converted once, in the Hugging Face cache.

The Hub repository `aydnarda/ACE-LoRA` holds the authors' own upload (their inference script and weights in their
format), so the released model is built from what exists today: BiomedCLIP on the Hub and the adapters shipped with
this package.
"""

import hashlib
import json
import pickle
from contextlib import contextmanager
from pathlib import Path

import torch
from filelock import FileLock
from huggingface_hub import constants
from huggingface_hub.errors import StrictDataclassError
from safetensors import SafetensorError, safe_open
from transformers import AutoModel, AutoProcessor
from transformers.utils import logging

from .convert import ConversionSources, convert_sources, resolve_sources, save_model_folder
from ..models.ace_lora.configuration_ace_lora import AceLoraConfig
from ..models.ace_lora.errors import FormatVersionError
from ..errors import AceLoraError, CheckpointError, ConfigError, ModelSourceError
from .hub import hub_file
from ..models.ace_lora.modeling_ace_lora import AceLoraModel
from ..models.ace_lora.processing_ace_lora import AceLoraProcessor
from .released_adapters import RELEASED


logger = logging.get_logger(__name__)

BIOMEDCLIP_REPO_ID = "microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224"
# Bump when a conversion of the same sources would give a different folder, so that old cache entries are not used.
CONVERSION_FORMAT = 2
CONVERSION_RECORD = "ace_lora_conversion.json"
SAFE_WEIGHTS = "model.safetensors"
# The dtypes weights may be stored in, as safetensors names them -> as config.json names them.
WEIGHT_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}
SUB_CONFIGS = ("vision_config", "text_config")


def conversion_cache(cache_dir: str | Path | None = None) -> Path:
    """Where converted models are kept: `HF_HOME/ace-lora-hf/converted` unless `cache_dir` says otherwise."""
    return Path(cache_dir) if cache_dir is not None else Path(constants.HF_HOME) / "ace-lora-hf" / "converted"


def _fingerprint(path: Path) -> dict:
    """What identifies a source: a Hub snapshot by its path (which names the commit), a local file by size and time."""
    stat = path.stat()
    return {"path": str(path.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _conversion_key(sources: ConversionSources) -> str:
    record = {
        "format": CONVERSION_FORMAT,
        "biomedclip": _fingerprint(sources.biomedclip / "open_clip_pytorch_model.bin"),
        "tokenizer": str(sources.tokenizer.resolve()),
        "adapters": None if sources.adapters is None else sources.adapters.sha256(),
    }
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:20]


def released_model_folder(
    biomedclip: str | Path = BIOMEDCLIP_REPO_ID,
    adapters: str | Path | None = RELEASED,
    revision: str | None = None,
    tokenizer: str | Path | None = None,
    cache_dir: str | Path | None = None,
) -> Path:
    """The model built from BiomedCLIP (a Hub id or folder) and `adapters` as a `save_pretrained` folder: converted
    on the first call and kept in the cache, loaded from there by later calls (offline too, once cached)."""
    sources = resolve_sources(biomedclip, adapters, tokenizer, revision)
    cache = conversion_cache(cache_dir)
    folder = cache / _conversion_key(sources)
    if (folder / CONVERSION_RECORD).is_file():
        return folder
    cache.mkdir(parents=True, exist_ok=True)
    # Another process may be converting the same sources: wait for it rather than convert twice.
    with FileLock(cache / f".{folder.name}.lock"):
        if not (folder / CONVERSION_RECORD).is_file():
            logger.warning("Converting %s with %s adapters (once; kept in %s)", biomedclip, adapters, folder)
            model, processor = convert_sources(sources)
            save_model_folder(model, processor, folder)
            record = {"biomedclip": str(biomedclip), "revision": revision, "tokenizer": str(sources.tokenizer),
                      "adapters": None if adapters is None else str(adapters)}
            (folder / CONVERSION_RECORD).write_text(json.dumps(record, indent=2))
    return folder


def model_folder(source: str | Path | None, option: str = "--model", revision: str | None = None, **released) -> str:
    """A loadable folder or Hub id for `source`: the released model when `source` is None or "released", else
    `source` itself once its config says it is an ACE-LoRA model (a foreign one is refused, saying what to run)."""
    if source is None or str(source) == RELEASED:
        return str(released_model_folder(**released))
    config_path = hub_file(source, "config.json", option, revision)
    if config_path is None:
        raise ModelSourceError(f"{option} {source}: not a model in ACE-LoRA's transformers format (no config.json). "
                               f"{_foreign_model_advice(source)}")
    config = _read_config(config_path)
    model_type = config.get("model_type")
    if model_type != "ace_lora":
        raise ModelSourceError(f"{option} {source}: a {model_type or 'unknown'} model, not ACE-LoRA. "
                               f"{_foreign_model_advice(source)}")
    _refuse_unsupported_dtypes(config, f"{option} {source}/config.json")
    try:
        AceLoraConfig.from_dict(config)  # every field checked now, before anything loads
    except (ConfigError, FormatVersionError, StrictDataclassError) as error:
        raise _config_error(error, f"{option} {source}") from None
    return str(source)


def _refuse_unsupported_dtypes(config: dict, where: str) -> None:
    """A `dtype` the model cannot run in (int8, a typo) is refused: transformers would ignore it silently."""
    for part, fields in [("", config), *((f"{name}.", config.get(name) or {}) for name in SUB_CONFIGS)]:
        value = fields.get("dtype") if isinstance(fields, dict) else None
        if value is not None and value not in WEIGHT_DTYPES.values():
            raise ConfigError(f"{where}: {part}dtype is {value!r}; ACE-LoRA runs in {', '.join(WEIGHT_DTYPES.values())}"
                              ": fix the value or remove it.")


def _refuse_non_float_tensors(folder: str | Path, where: str, revision: str | None) -> None:
    """Every tensor of the weights files is stored as float32, float16 or bfloat16: transformers would cast a bool,
    integer or float8 tensor to the model's dtype without a word, giving other numbers than the file's author had."""
    path = Path(folder)
    files = (sorted(path.glob("*.safetensors")) if path.is_dir()
             else [hub_file(folder, SAFE_WEIGHTS, "--model", revision)])
    for file in filter(None, files):
        try:
            with safe_open(file, "pt") as weights:
                for name in weights.keys():
                    stored = weights.get_slice(name).get_dtype()
                    if stored not in WEIGHT_DTYPES:
                        raise CheckpointError(f"{where}: tensor {name} of {file.name} is stored as {stored}; ACE-LoRA "
                                              "weights are floating point (float32, float16 or bfloat16): convert or "
                                              "save the model again.")
        except SafetensorError as error:
            raise CheckpointError(f"{where}: its weights file is unreadable ({file.name}: {error}); it may be "
                                  "truncated: download or convert it again.") from None


def _config_error(error: Exception, where: str) -> AceLoraError:
    cause = error.__cause__ if isinstance(error, StrictDataclassError) and error.__cause__ else error
    if isinstance(cause, FormatVersionError):  # its message ("config.json: ...") names the fix: a newer ace-lora-hf
        return FormatVersionError(f"{where}/{cause}")
    return ConfigError(f"{where}/config.json: {str(cause).rstrip('.')}; fix the value or convert the model again.")


def _foreign_model_advice(source: str | Path) -> str:
    adapters = sorted(Path(source).glob("*.pt")) if Path(source).is_dir() else []
    if adapters:
        return (f"To apply the adapters {adapters[0]} to BiomedCLIP, pass --adapters {adapters[0]} instead of "
                f"--model, or convert them once: ace-lora-convert --biomedclip {BIOMEDCLIP_REPO_ID} "
                f"--ace-checkpoint {adapters[0]} --output DIR.")
    return ("Leave --model out to build the released ACE-LoRA model from BiomedCLIP (aydnarda/ACE-LoRA on the Hub is "
            "the authors' own upload, not this format), or pass a folder written by ace-lora-convert or "
            "save_pretrained.")


def _read_config(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{path}: not valid JSON ({error}).") from None


def load_model_and_processor(
    source: str | Path | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    revision: str | None = None,
    for_inference: bool = True,
    **released,
) -> tuple[AceLoraModel, AceLoraProcessor]:
    """Model and processor of `source` (see `model_folder`); with `for_inference`, LoRA merged and eval mode.

    Every way a folder can be unusable (a truncated weights file, an invalid config, no processor) is an
    `AceLoraError` naming the file and the fix.
    """
    folder = model_folder(source, revision=revision, **released)
    model = load_pretrained(AutoModel, folder, revision=revision, dtype=dtype)
    processor = load_pretrained(AutoProcessor, folder, revision=revision)
    if for_inference:
        model.merge_lora()
        model.eval()
    return model.to(device), processor


def load_pretrained(model_class, folder: str | Path, option: str | None = None, **kwargs):
    """`model_class.from_pretrained(folder, **kwargs)` (any model class, an Auto class or `AutoProcessor`; None
    values left out); every way the folder can be unusable is an `AceLoraError` naming it (after `option`, the
    command-line option it came from, when given) and the fix. A model whose weights lack a tensor of its encoders, or
    hold one of another shape than its config gives, is refused rather than run with fresh weights there; a head's
    own weights may be missing (they are trained from scratch)."""
    where = f"{option} {folder}" if option else str(folder)
    kwargs = {key: value for key, value in kwargs.items() if value is not None}
    if model_class is AutoProcessor:
        return _load_processor(folder, where, **kwargs)
    if Path(folder).is_dir() and not any(Path(folder).glob("*.safetensors")) and not (
            Path(folder) / "pytorch_model.bin").is_file():
        raise CheckpointError(f"{where}: no weights file ({SAFE_WEIGHTS}) in the folder; download or convert the "
                              "model again.")
    _refuse_non_float_tensors(folder, where, kwargs.get("revision"))
    try:
        with _quiet_loading_report():
            model, loading_info = model_class.from_pretrained(folder, ignore_mismatched_sizes=True,
                                                              output_loading_info=True, **kwargs)
    except (ConfigError, FormatVersionError, StrictDataclassError) as error:
        raise _config_error(error, where) from None
    except AceLoraError:
        raise
    except SafetensorError as error:
        raise CheckpointError(f"{where}: its weights file is unreadable ({error}); it may be truncated: download or "
                              "convert it again.") from None
    except pickle.UnpicklingError:
        raise CheckpointError(f"{where}: its weights are a pickle with more than tensors in it, which is never "
                              "unpickled here; use a folder with model.safetensors.") from None
    except OSError as error:
        raise CheckpointError(f"{where}: cannot load its weights ({_shortened(error)}).") from None
    _check_loading_info(loading_info, where, set(dict(model.named_children())))
    _refuse_non_finite_weights(model, where)
    return model


def _load_processor(folder: str | Path, where: str, **kwargs):
    try:
        return AutoProcessor.from_pretrained(folder, **kwargs)
    except AceLoraError:
        raise
    except (OSError, ValueError) as error:  # a missing, unparsable or invalid tokenizer or processor file
        raise CheckpointError(f"{where}: cannot load its processor ({_shortened(error)}); a folder written by "
                              "ace-lora-convert, or by save_pretrained of both the model and its AceLoraProcessor, "
                              "has a working one.") from None


def _check_loading_info(loading_info: dict, where: str, parts: set[str]) -> None:
    """Refuse weights that do not fit: a tensor of another shape, an encoder tensor missing, or a tensor of one of the
    model's own `parts` that the config does not call for (a tower's tensors are expected where a head keeps only
    the vision tower)."""
    encoder_prefixes = ("vision_model.", "text_model.", "logit_scale")
    mismatched = sorted(loading_info["mismatched_keys"])
    if mismatched:
        name, saved, expected = mismatched[0]
        raise CheckpointError(f"{where}: its config.json does not fit its weights: {name} is saved as "
                              f"{list(saved)} but the config makes it {list(expected)}"
                              f"{f' (and {len(mismatched) - 1} more)' if len(mismatched) > 1 else ''}; use the "
                              "config.json saved with these weights.")
    missing = sorted(key for key in loading_info["missing_keys"] if key.startswith(encoder_prefixes))
    if missing:
        raise CheckpointError(f"{where}: its weights lack {missing[0]}"
                              f"{f' and {len(missing) - 1} more tensors' if len(missing) > 1 else ''} that its "
                              "config.json calls for; download or convert the model again.")
    extra = sorted(key for key in loading_info["unexpected_keys"] if key.split(".")[0] in parts)
    if extra:
        raise CheckpointError(f"{where}: its weights hold {extra[0]}"
                              f"{f' and {len(extra) - 1} more tensors' if len(extra) > 1 else ''} that its "
                              "config.json does not call for; use the config.json saved with these weights.")


def _refuse_non_finite_weights(model: torch.nn.Module, where: str) -> None:
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise CheckpointError(f"{where}: weight {name} contains NaN or infinite values; the checkpoint is damaged "
                                  "or comes from a diverged training run.")


@contextmanager
def _quiet_loading_report():
    """transformers logs a multi-line report of missing and mismatched weights; `_check_loading_info` says it in
    one line instead (a head's fresh weights need no report)."""
    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(verbosity)


def _shortened(error: Exception) -> str:
    reason = " ".join(str(error).split())
    return f"{reason[:200]}{'…' if len(reason) > 200 else ''}"


__all__ = ["BIOMEDCLIP_REPO_ID", "load_model_and_processor", "load_pretrained", "model_folder", "released_model_folder"]
