"""`nemo-qat-flow` / `python nemo_run/nemo_qat_flow.py`: settings -> checks -> the nemo_run graph -> the executor
that runs it (qatflow.executors)."""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
import warnings
from contextlib import suppress
from pathlib import Path
from typing import TYPE_CHECKING

from qatflow import artifacts, paths
from qatflow.config import BACKENDS, EXECUTORS, ConfigError, FlowConfig, build_config
from qatflow.stages import STAGE_NAMES

if TYPE_CHECKING:
    from qatflow.cluster_checks import InputPath
    from qatflow.executors import FlowExecutor

DEFAULT_RECIPE = "smollm2_135m"
# argparse takes "-1e-5" for a flag (its own pattern knows only -1 and -.5); these are values: no flag looks so.
NEGATIVE_NUMBER = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")


class Parser(argparse.ArgumentParser):
    """argparse with its errors in one line (not the usage block) and negative numbers read as values."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._negative_number_matcher = NEGATIVE_NUMBER

    def error(self, message: str):
        self.exit(2, f"error: {message}; see {self.prog} --help\n")


def _flag(parser: argparse.ArgumentParser, name: str, **kwargs) -> None:
    """A kebab-case flag that also accepts the upstream flow's underscore spelling."""
    spellings = [f"--{name}"]
    if "-" in name:
        spellings.append(f"--{name.replace('-', '_')}")
    parser.add_argument(*spellings, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="nemo_qat_flow.py",
        description="Quantization-aware training (QAT) or distillation (QAD, --distill) of a Hugging Face LLM to "
                    "NVFP4 as a nemo_run experiment: 00_data -> 01_import -> 02_ptq -> 03_train -> 04_export -> "
                    "05_verify, with BF16/PTQ/trained evaluation and a report.")
    _flag(parser, "recipe", default=DEFAULT_RECIPE,
          help="shipped recipe name (recipes/<name>.yaml; <name>_qad / <name>_qat picked by --distill) or a YAML path")
    _flag(parser, "model-name", help="HF hub id, local HF folder, .gguf file or pkg://<package>/<file>")
    _flag(parser, "data-path", help="OpenAI-messages or ShareGPT JSONL, or a folder with training/validation.jsonl")
    _flag(parser, "distill", action="store_true", default=None,
          help="QAD: distil from the full-precision teacher (default QAT with cross-entropy)")
    _flag(parser, "chat-template", help="Jinja chat template file or shipped name; overrides the tokenizer's")
    _flag(parser, "hf-tokenizer", help="tokenizer (hub id or folder) to use instead of the model's")
    _flag(parser, "algorithm", help="quantization format (nvfp4, fp8, int8_sq, int4_awq, w4a8_awq, ...)")
    _flag(parser, "kv-cache-qformat", help="KV-cache format when --enable-kv-cache: fp8 or nvfp4")
    _flag(parser, "enable-kv-cache", action="store_true", default=None, help="quantize the KV cache too")
    _flag(parser, "learning-rate", type=float, help="learning rate of QAT and QAD alike")
    _flag(parser, "experiment", help="experiment name: outputs go to <log-dir>/<experiment>/")
    _flag(parser, "log-dir", help="root folder of experiments (default logs)")
    _flag(parser, "ptq-gpus", type=int, help="GPUs for import, PTQ, export and evaluation")
    _flag(parser, "train-gpus", type=int, help="GPUs per node for training")
    _flag(parser, "train-nodes", type=int, help="nodes for training")
    _flag(parser, "tensor-parallelism", type=int, help="tensor-parallel size (nemo backend)")
    _flag(parser, "pipeline-parallelism", type=int, help="pipeline-parallel size (nemo backend)")
    _flag(parser, "nemo-env", choices=("te", "gpu-local", "cpu"),
          help="nemo backend machine: te (NeMo container), gpu-local (GPU without Transformer Engine) or cpu "
               "(also --device cpu)")
    _flag(parser, "backend", choices=BACKENDS, help="hf (transformers + ModelOpt) or nemo (NeMo 2 / megatron-core)")
    _flag(parser, "executor", choices=EXECUTORS, help="where stages run")
    _flag(parser, "use-slurm", action="store_true", help="same as --executor slurm")
    _flag(parser, "slurm-profile", default=os.environ.get("QATFLOW_SLURM_PROFILE"),
          help="Slurm cluster profile: slurm/<cluster>.yaml or a shipped name (default $QATFLOW_SLURM_PROFILE)")
    parser.add_argument("--status", action="store_true",
                        help="print the Slurm jobs of this experiment's last submission; exit 1 if one failed")
    parser.add_argument("--logs", metavar="STAGE", choices=STAGE_NAMES, help="print the Slurm job log of STAGE")
    parser.add_argument("--cancel", action="store_true", help="cancel the unfinished Slurm jobs of this experiment")
    _flag(parser, "device", choices=("auto", "cpu", "cuda"),
          help="where stages compute, either backend (default auto: the GPU where the job has one)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override any setting, e.g. --set train.lr=2e-5 (repeatable)")
    _flag(parser, "dry-run", action="store_true", help="print the graph and exit without running anything")
    parser.add_argument("--force", action="store_true", help="redo every stage")
    _flag(parser, "from-stage", choices=STAGE_NAMES, help="redo this stage and every stage after it")
    return parser


def flag_layer(args: argparse.Namespace) -> dict:
    """CLI flags as a config layer; flags not given leave the recipe's values."""
    mapping = {
        "model_name": "model.name", "hf_tokenizer": "model.hf_tokenizer", "chat_template": "model.chat_template",
        "data_path": "data.path", "algorithm": "ptq.algorithm", "kv_cache_qformat": "ptq.kv_cache_qformat",
        "enable_kv_cache": "ptq.enable_kv_cache", "learning_rate": "train.lr", "experiment": "run.experiment",
        "log_dir": "run.log_dir", "ptq_gpus": "run.ptq_gpus", "train_gpus": "run.train_gpus",
        "train_nodes": "run.train_nodes", "tensor_parallelism": "run.tensor_parallelism",
        "pipeline_parallelism": "run.pipeline_parallelism", "backend": "run.backend", "executor": "run.executor",
        "device": "run.device", "slurm_profile": "run.slurm_profile",
    }
    layer: dict = {}
    for attribute, dotted in mapping.items():
        value = getattr(args, attribute)
        if value is None:
            continue
        if attribute in ("model_name", "data_path", "chat_template", "hf_tokenizer", "log_dir", "slurm_profile"):
            value = paths.absolutize(value)
        section, key = dotted.split(".")
        layer.setdefault(section, {})[key] = value
    if args.distill:
        layer.setdefault("train", {})["method"] = "qad"
    if args.use_slurm:
        layer.setdefault("run", {})["executor"] = "slurm"
    if getattr(args, "nemo_env", None):
        from qatflow.backends.nemo.settings import ENVIRONMENTS

        device = ENVIRONMENTS[args.nemo_env].get("run", {}).get("device")
        if device and args.device not in (None, device):
            raise ConfigError(f"--nemo-env {args.nemo_env} runs on {device} (run.device={device}); drop --device "
                              f"{args.device}")
        for section, values in ENVIRONMENTS[args.nemo_env].items():
            layer.setdefault(section, {}).update(values)
    return layer


def pick_recipe(recipe: str, distill: bool | None) -> str:
    """`smollm2_135m` -> `smollm2_135m_qad` with --distill, `smollm2_135m_qat` without, when those exist."""
    if Path(recipe).suffix in (".yaml", ".yml") or (paths.recipes_dir() / f"{recipe}.yaml").is_file():
        return recipe
    method_recipe = f"{recipe}_{'qad' if distill else 'qat'}"
    return method_recipe if (paths.recipes_dir() / f"{method_recipe}.yaml").is_file() else recipe


def absolutize_paths(config: FlowConfig) -> None:
    """Settings from recipes or --set may name relative paths too; jobs run elsewhere."""
    config.run.log_dir = str(Path(config.run.log_dir).expanduser().resolve())
    if config.model.chat_template:
        template = paths.absolutize(config.model.chat_template) or config.model.chat_template
        # A template that is not here is refused by input_checks, or left to the cluster (cluster_checks).
        with suppress(ConfigError):
            template = str(paths.resolve_chat_template(template))
        config.model.chat_template = template
    config.data.path = paths.absolutize(config.data.path)
    config.eval.text_path = paths.absolutize(config.eval.text_path)
    config.model.name = paths.absolutize(config.model.name) or config.model.name


def load_config(argv: list[str] | None = None) -> tuple[FlowConfig, argparse.Namespace]:
    from qatflow import input_checks

    args = build_parser().parse_args(argv)
    recipe = pick_recipe(args.recipe, args.distill)
    input_checks.check_recipe(recipe)
    config = build_config(recipe, flag_layer(args), args.overrides)
    absolutize_paths(config)
    from qatflow.executors import get_executor

    executor = get_executor(config)
    executor.check_settings(config)
    device = executor.job_device(config)
    deferred = {item.check for item in deferred_paths(config, executor)}
    input_checks.check_files(config, dry_run=args.dry_run, deferred=deferred)
    from qatflow.preflight import preflight

    preflight(config, device=device)
    return config, args


def deferred_paths(config: FlowConfig, executor: FlowExecutor) -> list[InputPath]:
    """The paths named by the settings that are not on this machine but may be on the cluster the jobs run on:
    the first job checks them (qatflow.cluster_checks)."""
    from qatflow import cluster_checks

    on_cluster = cluster_checks.forced() or executor.paths_on_cluster(config)
    return cluster_checks.paths_to_defer(cluster_checks.input_paths(config), on_cluster)


def print_results(config: FlowConfig) -> None:
    export_dir = artifacts.export_checkpoint(config.experiment_dir)
    report = artifacts.report_file(config.experiment_dir)
    print(f"\nNVFP4 checkpoint: {export_dir}" if export_dir.exists() else "")
    print(f"report:           {report}" if report.exists() else "")


def print_error(error: Exception) -> None:
    from qatflow.input_checks import one_line

    print(f"error: {one_line(omit_omegaconf_details(str(error)))}", file=sys.stderr)


# OmegaConf appends lines such as "    full_key: train.nope" and "    object_type=TrainConfig" to its messages: the
# setting is already named, so they only lengthen the error.
OMEGACONF_DETAIL = re.compile(r"\n\s+(full_key|object_type|reference_type|value_type|key)[:=][^\n]*?(?=\.\s|$)",
                              re.MULTILINE)


def omit_omegaconf_details(message: str) -> str:
    return OMEGACONF_DETAIL.sub("", message)


TRACEBACK = "Traceback (most recent call last):"
# What a log line may start with besides the stage's own output: torchrun's "[default0]:" rank prefix.
RANK_PREFIX = re.compile(r"^\[default\d+\]:")
# The exception line: a (dotted) class name, a colon and its message.
EXCEPTION_LINE = re.compile(r"^(?:[A-Za-z_][\w]*\.)*([A-Za-z_]\w*(?:Error|Exception|Exit|Interrupt|Gone)): ?(.*)$")
MAX_ERROR_LINES = 6


def stage_error(log: Path) -> str | None:
    """The last exception a stage's log records, as its own message without the traceback (which stays in the
    log); None when the log holds no traceback."""
    from qatflow.input_checks import one_line

    lines = [RANK_PREFIX.sub("", line) for line in log.read_text(errors="replace").splitlines()]
    starts = [index for index, line in enumerate(lines) if line.strip() == TRACEBACK]
    if not starts:
        return None
    for index in range(starts[-1] + 1, len(lines)):
        match = EXCEPTION_LINE.match(lines[index])
        if match and not lines[index].startswith(" "):
            message = [f"{match.group(1)}: {match.group(2)}"]
            for line in lines[index + 1:index + MAX_ERROR_LINES]:
                if not line.strip() or not line.startswith(" "):
                    break
                message.append(line)  # a message of several lines (a list of bad rows)
            return one_line("\n".join(message))
    return None


def print_failures(config: FlowConfig, executor: FlowExecutor, failed: list[str], started: float) -> None:
    """Per failed stage its own error and its log; then the stages that did not start and what to run next."""
    print(f"\nstages without a complete result: {', '.join(failed)}", file=sys.stderr)
    not_started = []
    for stage in failed:
        log = executor.stage_log(config, stage)
        if log is None or log.stat().st_mtime < started:  # an earlier run's log: this run did not start it
            not_started.append(stage)
            continue
        print(f"  {stage} failed: {stage_error(log) or 'no error recorded; see its log'}", file=sys.stderr)
        print(f"  {stage} log: {log}", file=sys.stderr)
    if not_started:
        print(f"  not started (the run ends at a failed stage): {', '.join(not_started)}", file=sys.stderr)
    print("fix the first failed stage's cause and run the same command again: complete stages are kept",
          file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    from qatflow import cluster_checks, graph, input_checks
    from qatflow.executors import get_executor

    # torch warns on import that the pynvml package is deprecated: noise in every error of the CLI.
    warnings.filterwarnings("ignore", message="The pynvml package is deprecated")
    started = time.time()
    try:
        config, args = load_config(argv)
        executor = get_executor(config)
        if args.status or args.logs or args.cancel:
            return executor.follow(config, status=args.status, logs=args.logs, cancel=args.cancel)
        planned = graph.plan(config, force=args.force, from_stage=args.from_stage,
                             one_at_a_time=executor.one_at_a_time)
        pending = set(graph.pending(planned))
        deferred = deferred_paths(config, executor)
        input_checks.check_inputs(config, pending, dry_run=args.dry_run, deferred={item.check for item in deferred})
        planned = graph.checks_first(planned, cluster_checks.job_checks(deferred, pending))
    except ConfigError as error:
        print_error(error)
        return 2
    print(graph.describe(config, planned, executor.runs_in_process(config)))
    checking = next((stage.name for stage in planned if stage.checks), None)
    if checking:
        print(f"\n{cluster_checks.describe(deferred, checking)}")
    if args.dry_run:
        from qatflow.memory_plan import plan_for

        print(f"\n{plan_for(config).describe(config.run.gpu_memory_gb)}")
        scripts = executor.dry_run_text(config, planned)  # job scripts, containers: what would be started
        if scripts:
            print(scripts)
        return 0
    if not pending:
        print("\nevery stage is complete for these settings: nothing to run (use --force or --from-stage to redo)")
        print_results(config)
        return 0
    try:
        executor.check(config, planned)  # the cluster's or daemon's own answers, before anything is queued
    except ConfigError as error:
        print_error(error)
        return 2
    graph.forget(config, planned)
    config.experiment_dir.mkdir(parents=True, exist_ok=True)
    (config.experiment_dir / "config.yaml").write_text(config.to_yaml())
    failed = executor.run(config, planned)
    if failed:
        print_failures(config, executor, failed, started)
        return 1
    print(f"\nflow complete in {time.time() - started:.0f} s")
    print_results(config)
    return 0


if __name__ == "__main__":
    sys.exit(main())
