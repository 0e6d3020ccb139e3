"""Checks of every local input before anything is queued: recipe and profile files, the log folder, the model's
files, the tokenizer, the data (parsed in full, as 00_data will) and the chat template (compiled, then rendered on
a sample with the assistant-mask check). Each refusal is one ConfigError naming the input and the fix.

The parsers are the stages' own (qatflow.data, qatflow.chat, qatflow.tokens): what passes here passes there.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import struct
import sys
from pathlib import Path
from typing import Any, Callable, Collection

import yaml

from qatflow import paths
from qatflow.config import ConfigError, FlowConfig

# Conversations of the data that the chat template is rendered and masked on.
SAMPLE_SIZE = 16
# Used when the data is the built-in corpus (shipped, parsed only by 00_data): the shapes a template must handle.
BUILTIN_SAMPLE = [{"messages": [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Hello, who are you?"},
    {"role": "assistant", "content": "I am an assistant. How can I help?"},
    {"role": "user", "content": "Tell me one fact about honey."},
    {"role": "assistant", "content": "Honey never spoils."},
]}]
# Stages that load the tokenizer and render conversations with the chat template.
TEMPLATE_STAGES = {"01_import", "02_ptq", "03_train", "05_verify", "06_eval_bf16", "07_eval_ptq", "08_eval_trained"}
# Pseudo file systems: the kernel's views, where no folder of outputs can be made.
PSEUDO_ROOTS = (Path("/proc"), Path("/sys"), Path("/dev"))
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin", "*.pt", "*.pth")
WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
GGUF_MAGIC = b"GGUF"
# A safetensors header larger than this is not a header: the file is something else.
MAX_SAFETENSORS_HEADER = 100 * 1024 * 1024


# ---------------------------------------------------------------------------------------------- YAML files


def check_yaml_file(path: Path, setting: str) -> Any:
    """The parsed YAML of a settings file, or one line naming the file, the line and the fix."""
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as error:
        raise ConfigError(f"{setting} {path}: not UTF-8 text (byte {error.start}); save it as UTF-8 YAML") from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise ConfigError(f"{setting} {path}: not valid YAML{where} ({problem}); fix the file") from None
    except OSError as error:
        raise ConfigError(f"{setting} {path}: cannot read it ({error.strerror})") from None


def check_recipe(recipe: str) -> None:
    """The recipe and each recipe it inherits parse as YAML (config.load_recipe_layers reads them afterwards)."""
    seen: set[Path] = set()
    name: Any = recipe
    while isinstance(name, str) and name:
        path = paths.resolve_recipe(name)
        if path in seen:
            return  # an inherit loop: config.load_recipe_layers names it
        seen.add(path)
        data = check_yaml_file(path, "--recipe")
        name = data.get("inherit") if isinstance(data, dict) else None


# ---------------------------------------------------------------------------------------------- log folder


def check_log_dir(config: FlowConfig) -> None:
    """Every output goes under --log-dir: it must be (or become) a folder on a real file system."""
    log_dir = Path(config.run.log_dir)
    resolved = log_dir.resolve()
    for root in PSEUDO_ROOTS:
        if resolved == root or root in resolved.parents:
            raise ConfigError(f"--log-dir {log_dir}: under {root}, a kernel file system where no outputs can be "
                              f"written; give a folder on a disk")
    for candidate in (config.experiment_dir, log_dir, *log_dir.parents):
        if candidate.exists() and not candidate.is_dir():
            raise ConfigError(f"--log-dir {log_dir}: {candidate} is a file, not a folder; give a folder path "
                              f"(it is created if missing)")


# ---------------------------------------------------------------------------------------------- model files


def _is_path_like(name: str) -> bool:
    return name.startswith(("/", ".", "~")) or Path(name).expanduser().exists()


def check_model_files(config: FlowConfig, dry_run: bool = False) -> None:
    """The local model named by --model-name, read as far as 01_import reads it without loading weights (hub ids
    are resolved by check_inputs, which alone may use the network)."""
    name = config.model.name
    path = Path(name).expanduser()
    if name.startswith(paths.PACKAGE_SCHEME):
        path = paths.resolve_package_file(name)
        check_gguf(path, "--model-name")
    elif _is_path_like(name):
        if not path.exists():
            raise ConfigError(f"--model-name {name}: no such file or folder")
        if path.is_file() and path.suffix != ".gguf":
            raise ConfigError(f"--model-name {name}: a file that is not .gguf; give a HF folder, hub id or .gguf")
        if path.is_file():
            check_gguf(path, "--model-name")
        else:
            check_model_folder(path, weights=not dry_run)
    if config.run.backend == "nemo":
        check_model_parallel_split(config, path)


def check_model_parallel_split(config: FlowConfig, model_path: Path) -> None:
    """Megatron splits attention heads and KV heads over tensor-parallel ranks and layers over pipeline stages;
    a split that does not divide fails only inside 02_ptq, after the import. Local models are checked here."""
    import math

    from qatflow.model_shape import model_shape

    shape = model_shape(str(model_path))
    if shape is None:
        return
    tensor, pipeline = config.run.tensor_parallelism, config.run.pipeline_parallelism
    if shape["heads"] % tensor or shape["kv_heads"] % tensor:
        common = math.gcd(shape["heads"], shape["kv_heads"])
        fits = [str(n) for n in range(1, common + 1) if common % n == 0]
        raise ConfigError(f"--tensor-parallelism {tensor}: {config.model.name} has {shape['heads']} attention heads "
                          f"and {shape['kv_heads']} KV heads, which do not split over {tensor} ranks; use "
                          f"--tensor-parallelism {' or '.join(fits)}")
    if shape["layers"] and shape["layers"] % pipeline:
        raise ConfigError(f"--pipeline-parallelism {pipeline}: {config.model.name} has {shape['layers']} layers, "
                          f"which do not split into {pipeline} equal pipeline stages; use a divisor of "
                          f"{shape['layers']}")


def check_tokenizer_folder(config: FlowConfig) -> None:
    """A local --hf-tokenizer is a folder with tokenizer files."""
    tokenizer = config.model.hf_tokenizer
    if tokenizer and _is_path_like(tokenizer):
        if not Path(tokenizer).expanduser().is_dir():
            raise ConfigError(f"--hf-tokenizer {tokenizer}: no such folder; give a tokenizer folder or a hub id")
        elif not has_tokenizer_files(Path(tokenizer).expanduser()):
            raise ConfigError(f"--hf-tokenizer {tokenizer}: no tokenizer files in it (expected one of "
                              f"{', '.join(TOKENIZER_FILES)}); give a folder saved by save_pretrained")


def check_gguf(path: Path, setting: str) -> None:
    """A GGUF file starts with its magic and a version; a text file or a download error page does not."""
    with path.open("rb") as handle:
        head = handle.read(8)
    if len(head) < 8 or head[:4] != GGUF_MAGIC:
        raise ConfigError(f"{setting} {path}: not a GGUF file (it does not start with the GGUF magic bytes); "
                          f"download the .gguf again or give a Hugging Face model folder")
    version = struct.unpack("<I", head[4:8])[0]
    if version not in (1, 2, 3):
        raise ConfigError(f"{setting} {path}: GGUF version {version} is not one transformers reads (1-3); "
                          f"convert it with a current llama.cpp")


def check_model_folder(folder: Path, weights: bool = True) -> None:
    """config.json parses and names a model type, the weights are there and their headers are whole."""
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise ConfigError(f"--model-name {folder}: a folder without config.json; give a Hugging Face model folder "
                          f"(as save_pretrained or huggingface-cli download leave it), a hub id or a .gguf file")
    try:
        raw = json.loads(config_file.read_text(encoding="utf-8"))
    except OSError as error:
        raise ConfigError(f"--model-name {config_file}: cannot read it ({error.strerror})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        detail = f"{error.msg} at line {error.lineno}" if isinstance(error, json.JSONDecodeError) else "not UTF-8"
        raise ConfigError(f"--model-name {config_file}: not valid JSON ({detail}); fix it or download the model "
                          f"again") from None
    if not isinstance(raw, dict) or not raw.get("model_type"):
        raise ConfigError(f"--model-name {config_file}: no \"model_type\" in it, so transformers cannot tell which "
                          f"model this is; download the model's config.json again")
    if weights:
        for weight in weight_files(folder):
            if weight.suffix == ".safetensors":
                check_safetensors(weight)


def weight_files(folder: Path) -> list[Path]:
    """The folder's weight files (the shards its index lists, when it has one); refuses a folder without any."""
    for index_name in WEIGHT_INDEXES:
        index = folder / index_name
        if index.is_file():
            return _indexed_shards(index)
    found = sorted(p for pattern in WEIGHT_PATTERNS for p in folder.glob(pattern) if p.is_file())
    if not found:
        raise ConfigError(f"--model-name {folder}: no weights in it (no *.safetensors or pytorch_model*.bin); "
                          f"download the whole model, not only its config")
    return found


def _indexed_shards(index: Path) -> list[Path]:
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        shards = sorted({index.parent / name for name in weight_map.values()})
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError):
        raise ConfigError(f"--model-name {index}: not a valid weight index (JSON with a \"weight_map\"); download "
                          f"it again") from None
    missing = [shard.name for shard in shards if not shard.is_file()]
    if missing:
        raise ConfigError(f"--model-name {index.parent}: shard {missing[0]} listed in {index.name} is missing "
                          f"({len(missing)} of {len(shards)}); download the missing shards")
    return shards


def check_safetensors(path: Path) -> None:
    """The header is JSON and the file holds every byte it lists: a cut download or another file is refused."""
    size = path.stat().st_size
    with path.open("rb") as handle:
        prefix = handle.read(8)
        length = struct.unpack("<Q", prefix)[0] if len(prefix) == 8 else -1
        if length <= 0 or length > min(size - 8, MAX_SAFETENSORS_HEADER):
            raise ConfigError(f"--model-name {path}: not a safetensors file (no valid header); download it again")
        header_bytes = handle.read(length)
    try:
        header = json.loads(header_bytes)
        end = max((entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"), default=0)
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError, KeyError, TypeError, IndexError):
        raise ConfigError(f"--model-name {path}: not a safetensors file (its header is not a tensor table); "
                          f"download it again") from None
    expected = 8 + length + end
    if size < expected:
        raise ConfigError(f"--model-name {path}: truncated ({size} of {expected} bytes); download it again")


def has_tokenizer_files(folder: Path) -> bool:
    return any((folder / name).is_file() for name in TOKENIZER_FILES)


# ---------------------------------------------------------------------------------------------- hub ids


def _offline() -> bool:
    from huggingface_hub import constants

    return constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")


def check_hub_ids(config: FlowConfig, dry_run: bool = False) -> None:
    """The model and tokenizer named by hub ids, for 01_import."""
    for name, setting in ((config.model.name, "--model-name"), (config.model.hf_tokenizer, "--hf-tokenizer")):
        if name and not name.startswith(paths.PACKAGE_SCHEME) and not _is_path_like(name):
            check_hub_id(name, setting, dry_run, config.model.revision)


def check_hub_id(name: str, setting: str, dry_run: bool = False, revision: str | None = None) -> None:
    """A hub id resolves: from the local cache when it holds the model, else from the hub (which 01_import needs).
    A dry run only plans (the shipped recipes' models are downloaded by 01_import, perhaps on another machine): a
    model it cannot reach is a warning there."""
    try:
        _check_hub_id(name, setting, revision)
    except ConfigError as error:
        if not dry_run:
            raise
        print(f"warning: {error} (01_import needs it; a dry run goes on)", file=sys.stderr)


def _check_hub_id(name: str, setting: str, revision: str | None) -> None:
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.errors import HFValidationError

    try:
        cached = try_to_load_from_cache(name, "config.json", revision=revision)
    except HFValidationError:
        raise ConfigError(f"{setting} {name}: no such file or folder, and not a hub id (owner/name); give a local "
                          f"path or a Hugging Face hub id") from None
    if isinstance(cached, str):
        return  # transformers falls back to the cache when the hub is unreachable
    if _offline():
        raise ConfigError(f"{setting} {name}: a hub id, but HF_HUB_OFFLINE is set and the model is not in the "
                          f"Hugging Face cache; download it where the hub is reachable (huggingface-cli download "
                          f"{name}{f' --revision {revision}' if revision else ''}) or give a local folder or .gguf "
                          f"path")
    _resolve_on_hub(name, setting, revision)


def _resolve_on_hub(name: str, setting: str, revision: str | None) -> None:
    """One HEAD request for the model's config.json: huggingface_hub's own helpers retry for ~25 s and log each
    attempt, where one answer (or none) is all the check needs."""
    from huggingface_hub import hf_hub_url
    from huggingface_hub.errors import (EntryNotFoundError, GatedRepoError, RepositoryNotFoundError,
                                        RevisionNotFoundError)
    from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status

    try:
        response = get_session().head(hf_hub_url(name, "config.json", revision=revision), headers=build_hf_headers(),
                                      timeout=10, allow_redirects=True)
        hf_raise_for_status(response)
    except GatedRepoError:
        raise ConfigError(f"{setting} {name}: a gated model; accept its license on huggingface.co and export "
                          f"HF_TOKEN") from None
    except RevisionNotFoundError:
        raise ConfigError(f"{setting} {name}: the hub repository has no revision {revision!r} (model.revision); name "
                          f"one of its branches, tags or commits") from None
    except RepositoryNotFoundError:
        raise ConfigError(f"{setting} {name}: no such model on the Hugging Face hub (or a private one: export "
                          f"HF_TOKEN); check the id or give a local path") from None
    except EntryNotFoundError:
        raise ConfigError(f"{setting} {name}: the hub repository has no config.json, so it is not a transformers "
                          f"model; give a model repository or a local path") from None
    except Exception as error:  # connection refused, DNS, proxy, timeout: all mean the hub is out of reach
        raise ConfigError(f"{setting} {name}: the Hugging Face hub is unreachable ({type(error).__name__}) and the "
                          f"model is not in the local cache; give a local folder or .gguf path, or download it "
                          f"first and set HF_HUB_OFFLINE=1") from None


# ---------------------------------------------------------------------------------------------- data


def check_data_path(config: FlowConfig) -> None:
    if config.data.path and not Path(config.data.path).exists():
        raise ConfigError(f"--data-path {config.data.path}: no such file or folder")


def check_data(config: FlowConfig) -> list[dict]:
    """The data read and split exactly as 00_data will; returns a sample of its conversations. The built-in corpus
    is shipped and needs no check."""
    data = config.data
    if not data.path:
        return BUILTIN_SAMPLE
    from qatflow.data import DataError, load_splits

    skipped_rows = io.StringIO()
    try:
        with contextlib.redirect_stderr(skipped_rows):  # the stage lists skipped rows; here one line says so
            splits = load_splits(data.path, data.source, data.num_train, data.num_validation, data.seed,
                                 data.system_prompt, data.max_bad_fraction)
    except DataError as error:
        raise ConfigError(_with_setting("--data-path", data.path, one_line(str(error)))) from None
    if splits.skipped:
        first = skipped_rows.getvalue().splitlines()[1:2]
        print(f"warning: --data-path {data.path}: {splits.skipped} malformed of {splits.rows} rows will be skipped "
              f"(data.max_bad_fraction={data.max_bad_fraction}){'; first: ' + first[0].strip() if first else ''}",
              file=sys.stderr)
    return (splits.train + splits.validation)[:SAMPLE_SIZE]


def _with_setting(setting: str, value: str, message: str) -> str:
    """The message, starting with the setting that names the input (once: data errors start with their file)."""
    if message.startswith(setting):
        return message
    if message.startswith(value):
        return f"{setting} {message}"
    return f"{setting} {value}: {message}"


# ---------------------------------------------------------------------------------------------- chat template


def check_template_file(config: FlowConfig) -> None:
    """--chat-template names a file or a shipped template; NeMo's chat data needs its generation tags."""
    if not config.model.chat_template:
        return
    template = paths.resolve_chat_template(config.model.chat_template).read_text()
    if config.run.backend == "nemo" and "generation" not in template:
        raise ConfigError(f"--chat-template {config.model.chat_template}: NeMo's chat data needs "
                          f"{{% generation %}} tags around assistant replies for assistant-only loss; use a "
                          f"template shipped in chat_templates/ or add the tags")


def template_setting(config: FlowConfig) -> str:
    return (f"--chat-template {config.model.chat_template}" if config.model.chat_template
            else f"the chat template of {config.model.hf_tokenizer or config.model.name}")


def compile_template(text: str, where: str) -> None:
    """Compiles as transformers does (with the {% generation %} extension): a syntax error names its line."""
    from jinja2 import TemplateSyntaxError
    from transformers.utils.chat_template_utils import _compile_jinja_template

    try:
        _compile_jinja_template(text)
    except TemplateSyntaxError as error:
        raise ConfigError(f"{where}: Jinja syntax error at line {error.lineno} ({error.message}); fix the "
                          f"template") from None


def local_tokenizer_dir(config: FlowConfig) -> Path | None:
    """The folder the tokenizer loads from when it is on this machine and cheap to load (a GGUF file's vocabulary
    is converted only by 01_import; a hub tokenizer is downloaded there)."""
    for name in (config.model.hf_tokenizer, None if config.model.hf_tokenizer else config.model.name):
        if name and not name.startswith(paths.PACKAGE_SCHEME) and Path(name).expanduser().is_dir():
            return Path(name).expanduser()
    return None


def load_tokenizer(config: FlowConfig, folder: Path):
    """The tokenizer as 01_import loads it, with --chat-template applied."""
    from transformers import AutoTokenizer

    from qatflow.chat import apply_template_override

    setting = "--hf-tokenizer" if config.model.hf_tokenizer else "--model-name"
    if not has_tokenizer_files(folder):
        raise ConfigError(f"{setting} {folder}: no tokenizer files in it (expected one of "
                          f"{', '.join(TOKENIZER_FILES)}); add them or give --hf-tokenizer")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=config.model.trust_remote_code)
    except Exception as error:  # transformers raises OSError, ValueError or TypeError for broken tokenizer files
        raise ConfigError(f"{setting} {folder}: the tokenizer does not load ({type(error).__name__}: "
                          f"{one_line(str(error))[:200]}); fix its tokenizer files or give --hf-tokenizer") from None
    return apply_template_override(tokenizer, config.model.chat_template)


def check_chat_template(config: FlowConfig, sample: list[dict], dry_run: bool = False) -> None:
    """Compiles the template, then renders the sample and checks the assistant mask, with the tokenizer when it is
    local (tokens.tokenize_split, as every tokenizing stage runs it), else on the rendered text."""
    where = template_setting(config)
    folder = local_tokenizer_dir(config)
    if folder is not None and dry_run and not has_tokenizer_files(folder):
        folder = None  # a dry run plans from config.json alone: a folder of only that is not refused
    if folder is None:
        if config.model.chat_template:
            text = Path(config.model.chat_template).read_text(encoding="utf-8")
            compile_template(text, where)
            check_rendered_mask(_TemplateOnly(text), sample, where)
        return
    tokenizer = load_tokenizer(config, folder)
    if not tokenizer.chat_template:
        raise ConfigError(f"--model-name {config.model.name}: its tokenizer has no chat template; pass "
                          f"--chat-template with a file or one of "
                          f"{', '.join(paths.shipped_names(paths.chat_templates_dir(), '.jinja'))}")
    compile_template(tokenizer.get_chat_template(), where)
    from qatflow.chat import ChatTemplateError
    from qatflow.tokens import tokenize_split

    try:
        tokenize_split(tokenizer, sample, config.train.seq_len, "a sample of the data", log=lambda _line: None)
    except ChatTemplateError as error:
        raise ConfigError(f"{where}: {one_line(str(error))}") from None


class _TemplateOnly:
    """What qatflow.chat reads of a tokenizer to render a conversation, for a model whose tokenizer the CLI does
    not load: the template, and no special tokens."""

    name_or_path = ""
    special_tokens_map: dict = {}

    def __init__(self, template: str):
        self.chat_template = template

    def get_chat_template(self, tools=None) -> str:
        return self.chat_template

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=False, tools=None) -> str:
        from transformers.utils.chat_template_utils import render_jinja_template

        (text,), _ = render_jinja_template([messages], tools=tools, chat_template=self.chat_template,
                                           add_generation_prompt=add_generation_prompt)
        return text


def check_rendered_mask(template: _TemplateOnly, sample: list[dict], where: str) -> None:
    """The chat module's rendering and assistant spans on the sample, measured in characters: a template whose
    mask covers nothing or everything is refused as tokenize_split would refuse it."""
    from qatflow.chat import GENERATION_TAG, ChatTemplateError, assistant_spans, generation_spans

    rendered = supervised = 0
    try:
        for record in sample:
            messages, tools = record["messages"], record.get("tools")
            if GENERATION_TAG.search(template.chat_template):
                text, spans = generation_spans(template, messages, tools)
            else:
                text = template.apply_chat_template(messages, tools=tools)
                spans = assistant_spans(template, messages, text, tools=tools)
            rendered += len(text)
            supervised += sum(max(0, end - start) for start, end in spans)
    except ChatTemplateError as error:
        raise ConfigError(f"{where}: {one_line(str(error))}") from None
    except Exception as error:  # the template's own raise_exception() or an undefined filter
        raise ConfigError(f"{where}: rendering a conversation of the data failed ({type(error).__name__}: "
                          f"{one_line(str(error))}); fix the template") from None
    if supervised == 0:
        raise ConfigError(f"{where}: marks no assistant text of the data as supervised; wrap what the assistant "
                          f"writes in {{% generation %}} tags (see {paths.chat_templates_dir()})")
    if supervised >= rendered:
        raise ConfigError(f"{where}: marks the whole conversation as supervised, so prompts would be trained on; "
                          f"put {{% generation %}} tags around the assistant turns only")


# ---------------------------------------------------------------------------------------------- entry points


def one_line(message: str) -> str:
    """A message of several lines (a list of bad rows) as one line: "them:\n  a\n  b" -> "them: a; b"."""
    joined = ""
    for line in (line.strip() for line in message.splitlines() if line.strip()):
        joined += (" " if joined.endswith(":") else "; " if joined else "") + line
    return joined


def check_files(config: FlowConfig, dry_run: bool = False, deferred: Collection[str] = ()) -> None:
    """Cheap checks of files named by the settings (run before preflight, which reads some of them).
    A dry run plans from a model's config.json alone, so it does not ask for the weights. `deferred`: the
    qatflow.cluster_checks names of the paths that the first job checks instead (they are on the cluster only)."""
    check_log_dir(config)
    for name, check in path_checks(dry_run).items():
        if name not in deferred:
            check(config)


def path_checks(dry_run: bool = False) -> dict[str, Callable[[FlowConfig], None]]:
    """The check of each path the settings name, by its qatflow.cluster_checks name, in the order they run."""
    return {"chat_template": check_template_file, "data": check_data_path,
            "model": lambda config: check_model_files(config, dry_run=dry_run),
            "hf_tokenizer": check_tokenizer_folder, "eval_text": check_eval_text}


def check_eval_text(config: FlowConfig) -> None:
    """eval.text_path, the out-of-domain text the evaluations score, is a file."""
    if config.eval.text_path and not Path(config.eval.text_path).is_file():
        raise ConfigError(f"eval.text_path={config.eval.text_path}: no such file; give a .txt or .md file")


def check_inputs(config: FlowConfig, pending: set[str], dry_run: bool = False, deferred: Collection[str] = ()) -> None:
    """The data in full when 00_data will read it, then the tokenizer and chat template on a sample of it when a
    stage that tokenizes will run (a dry run does not ask for the tokenizer files of a folder that has none).
    A rerun whose stages are complete reads nothing again. What reads a `deferred` path is left to the first job."""
    if "01_import" in pending:
        check_hub_ids(config, dry_run=dry_run)
    if deferred:
        return  # the data and the rendering need a path that only the cluster has: the first job checks them
    if "00_data" in pending:
        sample = check_data(config)
    elif pending & TEMPLATE_STAGES:
        from qatflow.data import DataError
        from qatflow.tokens import read_split

        try:
            sample = read_split(config.experiment_dir / "00_data", "train", limit=SAMPLE_SIZE)
        except DataError as error:
            raise ConfigError(one_line(str(error))) from None
    if pending & TEMPLATE_STAGES:
        check_chat_template(config, sample, dry_run=dry_run)
