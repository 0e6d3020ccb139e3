"""Where files come from.

Files named on the command line resolve against the caller's working directory; shipped recipes and chat
templates resolve against the repository that holds this package (or $QATFLOW_HOME).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from qatflow.errors import ConfigError

PACKAGE_SCHEME = "pkg://"


def project_root() -> Path:
    if os.environ.get("QATFLOW_HOME"):
        return Path(os.environ["QATFLOW_HOME"]).resolve()
    return Path(__file__).resolve().parents[2]


def recipes_dir() -> Path:
    return project_root() / "recipes"


def chat_templates_dir() -> Path:
    return project_root() / "chat_templates"


def _config_error(message: str) -> Exception:
    return ConfigError(message)


def shipped_names(folder: Path, suffix: str) -> list[str]:
    return sorted(p.name[: -len(suffix)] for p in folder.glob(f"*{suffix}")) if folder.is_dir() else []


def resolve_recipe(recipe: str) -> Path:
    """A recipe path (.yaml), or the name of a shipped recipe."""
    candidate = Path(recipe).expanduser()
    if candidate.suffix in (".yaml", ".yml"):
        if candidate.is_file():
            return candidate.resolve()
        raise _config_error(f"--recipe {recipe}: no such file")
    shipped = recipes_dir() / f"{recipe}.yaml"
    if shipped.is_file():
        return shipped
    raise _config_error(f"--recipe {recipe}: not a shipped recipe; choose one of "
                        f"{', '.join(shipped_names(recipes_dir(), '.yaml'))} or give a .yaml path")


def resolve_chat_template(template: str) -> Path:
    """A Jinja file (caller-relative), or the name of a template shipped in chat_templates/."""
    candidate = Path(template).expanduser()
    if candidate.is_file():
        return candidate.resolve()
    for name in (template, f"{template}.jinja"):
        shipped = chat_templates_dir() / name
        if shipped.is_file():
            return shipped
    raise _config_error(f"--chat-template {template}: no such file and no shipped template of that name "
                        f"(shipped: {', '.join(shipped_names(chat_templates_dir(), '.jinja')) or 'none'})")


def resolve_package_file(uri: str) -> Path:
    """pkg://<package>/<file> -> the file inside the installed Python package."""
    package, _, relative = uri[len(PACKAGE_SCHEME):].partition("/")
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise _config_error(f"model {uri}: Python package {package!r} is not installed (run ./install.sh)")
    path = Path(list(spec.submodule_search_locations)[0]) / relative
    if not path.is_file():
        raise _config_error(f"model {uri}: {relative} is not in package {package!r}")
    return path


def absolutize(value: str | None) -> str | None:
    """Make a caller-relative path absolute if it names something on disk; leave hub ids and URIs alone."""
    if value is None or value.startswith(PACKAGE_SCHEME):
        return value
    candidate = Path(value).expanduser()
    if candidate.exists() or value.startswith((".", "/", "~")):
        return str(candidate.resolve())
    return value


def is_hub_id(name: str | None) -> bool:
    """A Hugging Face hub id (owner/name): not a pkg:// file, a .gguf file or a path on this machine."""
    if not name or name.startswith(PACKAGE_SCHEME) or name.endswith(".gguf"):
        return False
    return not (name.startswith(("/", ".", "~")) or Path(name).expanduser().exists())
