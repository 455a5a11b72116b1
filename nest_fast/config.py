"""NeMo-layout configs: the NEST Fast-Conformer defaults, size presets, YAML loading and overrides.

Configs are plain nested dicts (OmegaConf ``DictConfig`` inputs are converted), so ``import nest_fast``
needs neither OmegaConf nor Hydra. ``${a.b}`` interpolations are resolved as OmegaConf would for the
forms NeMo's configs use.
"""

from __future__ import annotations

import copy
import difflib
import os
import re
from typing import Any, Dict, Iterable, Mapping, Optional

import yaml

CONFIG_DIR = os.path.join(os.path.dirname(__file__), "configs")
DEFAULT_CONFIG = os.path.join(CONFIG_DIR, "nest_fast-conformer.yaml")

# SPEC §1.2: the yaml's size table (everything else as in the default config)
PRESETS: Dict[str, Dict[str, Any]] = {
    "small": dict(d_model=176, n_heads=4, n_layers=16, conv_kernel_size=9, weight_decay=0.0, xscaling=True,
                  use_bias=True),
    "medium": dict(d_model=256, n_heads=4, n_layers=16, conv_kernel_size=9, weight_decay=1e-3, xscaling=True,
                   use_bias=True),
    "large": dict(d_model=512, n_heads=8, n_layers=17, conv_kernel_size=9, weight_decay=1e-3, xscaling=True,
                  use_bias=True),
    "large18": dict(d_model=512, n_heads=8, n_layers=18, conv_kernel_size=9, weight_decay=1e-3, xscaling=True,
                    use_bias=True),
    "xlarge": dict(d_model=1024, n_heads=8, n_layers=24, conv_kernel_size=9, weight_decay=1e-3, xscaling=False,
                   use_bias=False),
    "xxlarge": dict(d_model=1024, n_heads=8, n_layers=42, conv_kernel_size=5, weight_decay=1e-3, xscaling=False,
                    use_bias=False),
}

_INTERP = re.compile(r"\$\{([^${}]+)\}")


class _Loader(yaml.SafeLoader):
    """SafeLoader that reads ``1e-3`` as a float (YAML 1.2 / OmegaConf), not a string."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
    |\.[0-9_]+(?:[eE][-+][0-9]+)?
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."))


def yaml_load(text_or_stream):
    return yaml.load(text_or_stream, Loader=_Loader)


def to_container(cfg: Any) -> Any:
    """Plain dict/list copy of a dict, list or OmegaConf config (interpolations resolved)."""
    if hasattr(cfg, "_metadata") and hasattr(cfg, "_get_node"):  # OmegaConf container, without importing it
        from omegaconf import OmegaConf  # noqa: WPS433 (only reached when the caller already uses OmegaConf)

        return OmegaConf.to_container(cfg, resolve=True)
    if isinstance(cfg, Mapping):
        return {k: to_container(v) for k, v in cfg.items()}
    if isinstance(cfg, (list, tuple)):
        return [to_container(v) for v in cfg]
    return cfg


def _lookup(root: Dict[str, Any], dotted: str) -> Any:
    node: Any = root
    for part in dotted.split("."):
        if isinstance(node, Mapping) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            raise KeyError(f"interpolation ${{{dotted}}} refers to a missing key")
    return node


def resolve(cfg: Dict[str, Any]) -> Dict[str, Any]:
    """Resolve ``${a.b.c}`` interpolations (absolute paths, as NeMo's yaml files use) in place."""

    def res(node: Any, depth: int = 0) -> Any:
        if depth > 32:
            raise ValueError("config interpolation is circular")
        if isinstance(node, dict):
            for k in list(node):
                node[k] = res(node[k], depth)
            return node
        if isinstance(node, list):
            return [res(v, depth) for v in node]
        if isinstance(node, str):
            m = _INTERP.fullmatch(node.strip())
            if m:
                return res(copy.deepcopy(_lookup(cfg, m.group(1).strip())), depth + 1)
            if _INTERP.search(node):
                return _INTERP.sub(lambda mm: str(res(copy.deepcopy(_lookup(cfg, mm.group(1).strip())),
                                                      depth + 1)), node)
        return node

    return res(cfg)


def _parse_value(text: str) -> Any:
    try:
        return yaml_load(text) if text != "" else ""
    except yaml.YAMLError:
        return text


def _all_keys(node: Any, prefix: str = "") -> Iterable[str]:
    if isinstance(node, Mapping):
        for k, v in node.items():
            path = f"{prefix}.{k}" if prefix else str(k)
            yield path
            yield from _all_keys(v, path)


def apply_overrides(cfg: Dict[str, Any], overrides: Iterable[str]) -> Dict[str, Any]:
    """Hydra-style overrides: ``a.b=1`` (key must exist), ``+a.b=1`` (add), ``++a.b=1`` (add or set), ``~a.b``."""
    for ov in overrides or ():
        if not isinstance(ov, str):
            raise TypeError(f"override must be a 'key=value' string, got {ov!r}")
        ov = ov.strip()
        if ov.startswith("~"):
            key, value, mode = ov[1:].split("=", 1)[0], None, "delete"
        else:
            if "=" not in ov:
                raise ValueError(f"override {ov!r} is not of the form key=value")
            key, value = ov.split("=", 1)
            mode = "add" if key.startswith("+") and not key.startswith("++") else "force" if key.startswith(
                "++") else "set"
            key = key.lstrip("+")
        parts = key.strip().split(".")
        node = cfg
        for i, part in enumerate(parts[:-1]):
            if not isinstance(node, dict) or (part not in node and mode == "set"):
                raise KeyError(_unknown_key_message(cfg, ".".join(parts[: i + 1])))
            if part not in node or node[part] is None:
                node[part] = {}
            node = node[part]
        leaf = parts[-1]
        if mode == "delete":
            if leaf not in node:
                raise KeyError(_unknown_key_message(cfg, key))
            del node[leaf]
        elif mode == "set" and leaf not in node:
            raise KeyError(_unknown_key_message(cfg, key) + f" (use +{key}=... to add a new key)")
        elif mode == "add" and leaf in node:
            raise KeyError(f"override +{key}: key already exists; use {key}=... to change it")
        else:
            node[leaf] = _parse_value(value)
    return cfg


def _unknown_key_message(cfg: Dict[str, Any], key: str) -> str:
    keys = list(_all_keys(cfg))
    near = difflib.get_close_matches(key, keys, n=1, cutoff=0.5)
    hint = f"; did you mean '{near[0]}'?" if near else ""
    return f"unknown config key '{key}'{hint}"


def load_config(path: Optional[str] = None, overrides: Iterable[str] = ()) -> Dict[str, Any]:
    """Read a whole NeMo YAML (``name``, ``model``, ``trainer``, ``exp_manager``) with ``key=value`` overrides.

    ``path=None`` reads nest_fast's copy of NeMo's ``nest_fast-conformer.yaml``. A ``preset=NAME``
    override (small/medium/large/large18/xlarge/xxlarge) applies a size from SPEC §1.2 first.
    """
    path = path or DEFAULT_CONFIG
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file not found: {path}")
    with open(path) as f:
        cfg = yaml_load(f)
    if not isinstance(cfg, dict):
        raise ValueError(f"config file {path} does not hold a YAML mapping")
    overrides = list(overrides or ())
    presets = [o for o in overrides if o.split("=", 1)[0] == "preset"]
    overrides = [o for o in overrides if o.split("=", 1)[0] != "preset"]
    if presets:
        apply_preset(cfg, presets[-1].split("=", 1)[1])
    apply_overrides(cfg, overrides)
    return resolve(cfg)


def apply_preset(cfg: Dict[str, Any], name: str) -> Dict[str, Any]:
    """Set the encoder size (and weight decay) of a whole config, or of its ``model`` section, in place."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    p = PRESETS[name]
    model = cfg["model"] if "model" in cfg else cfg
    enc = model.setdefault("encoder", {})
    for k in ("d_model", "n_heads", "n_layers", "conv_kernel_size", "xscaling", "use_bias"):
        enc[k] = p[k]
    model.setdefault("optim", {})["weight_decay"] = p["weight_decay"]
    return cfg


def model_config(preset: str = "large", **encoder_overrides: Any) -> Dict[str, Any]:
    """The ``model:`` section of the default config at a preset size, interpolations resolved."""
    with open(DEFAULT_CONFIG) as f:
        cfg = yaml_load(f)
    apply_preset(cfg, preset)
    cfg["model"]["encoder"].update(encoder_overrides)
    return resolve(cfg)["model"]
