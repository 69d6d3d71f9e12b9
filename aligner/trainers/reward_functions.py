"""Python reward functions named in a config: resolve the import paths, call them per batch, weight them.

    funcs = RewardFunctions(["aligner.algorithms.rewards:accuracy", "examples/rewards.py:brevity"], [1.0, 0.2])
    funcs.check_columns(["prompt", "solution"])                    # before any model loads
    total, per_function = funcs(prompts, completions, {"solution": solutions})

A spec is ``"package.module:function"`` or ``"path/to/file.py:function"`` (relative paths are relative to
the current directory). A function is called once per batch as ``fn(prompts=..., completions=..., **columns)``
(positionally when its parameters are named otherwise) and returns one ``float | None`` per completion: TRL's
``GRPOTrainer`` contract, so functions written for it, such as ``fn(completions, **kwargs)``, work unchanged.
A function without ``**kwargs`` gets only the columns it names. ``None`` (or NaN) means "not applicable":
the weighted sum skips it (a NaN-sum, as TRL does), and a sample no function applies to scores 0 with a
warning. Every spec is resolved when the object is built, so a typo stops the job before a model loads.
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import math
import numbers
import sys
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

BUILTIN_MODULE = "aligner.algorithms.rewards"
BUILTINS = ("accuracy", "format_reward")  # bare names resolve to BUILTIN_MODULE
SPEC_SHAPE = "'package.module:function' or 'path/to/file.py:function'"


class RewardFunctionError(ValueError):
    """A reward function that cannot be resolved or called, or that returned something unusable."""


def _load_file_module(path_text: str, spec: str) -> Any:
    """The module at a ``.py`` path, imported once per absolute path under a private name."""
    path = Path(path_text).expanduser().resolve()
    if not path.is_file():
        raise RewardFunctionError(f"reward function '{spec}': no file {path} (relative paths are relative to the "
                                  f"current directory {Path.cwd()}); fix the path or use a module import path")
    name = f"aligner_reward_file_{path.stem}_{hashlib.sha1(str(path).encode()).hexdigest()[:8]}"
    if name in sys.modules:
        return sys.modules[name]
    module_spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module  # before exec, so dataclasses and pickling inside the file can find it
    try:
        module_spec.loader.exec_module(module)
    except Exception as error:
        del sys.modules[name]
        raise RewardFunctionError(f"reward function '{spec}': running {path} failed with "
                                  f"{type(error).__name__}: {error}; fix the file") from error
    return module


def _import_module(module_name: str, spec: str) -> Any:
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        # Only a missing module of the spec itself is a bad path; a missing dependency inside it is the module's.
        if error.name and (module_name == error.name or module_name.startswith(error.name + ".")):
            raise RewardFunctionError(
                f"reward function '{spec}': no module named '{module_name}'; check the spelling, install the "
                f"package or add its directory to PYTHONPATH, or give a file path ('path/to/file.py:function')"
            ) from error
        raise RewardFunctionError(f"reward function '{spec}': importing '{module_name}' failed: {error}; "
                                  f"install what it imports") from error
    except Exception as error:
        raise RewardFunctionError(f"reward function '{spec}': importing '{module_name}' failed with "
                                  f"{type(error).__name__}: {error}; fix the module") from error


def resolve_reward_function(spec: str) -> Callable[..., Any]:
    """The callable a spec names: ``"pkg.mod:fn"``, ``"path/to/file.py:fn"``, or a built-in's bare name."""
    if not isinstance(spec, str) or not spec.strip():
        raise RewardFunctionError(f"reward function {spec!r}: expected a string {SPEC_SHAPE}")
    spec = spec.strip()
    if ":" not in spec or spec.endswith(":"):
        if spec in BUILTINS:
            spec = f"{BUILTIN_MODULE}:{spec}"
        else:
            raise RewardFunctionError(f"reward function '{spec}': expected {SPEC_SHAPE} (the part after ':' names "
                                      f"the function); built-ins: {', '.join(BUILTINS)}")
    location, attribute = spec.rsplit(":", 1)  # rsplit keeps a Windows drive letter in the path
    is_file = location.endswith(".py") or "/" in location or "\\" in location
    module = _load_file_module(location, spec) if is_file else _import_module(location, spec)
    target: Any = module
    for part in attribute.split("."):  # "module:Class.method" works too
        if not hasattr(target, part):
            available = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_")
                               and getattr(v, "__module__", None) == module.__name__)
            raise RewardFunctionError(f"reward function '{spec}': '{location}' has no '{attribute}'; functions "
                                      f"defined there: {', '.join(available) or 'none'}")
        target = getattr(target, part)
    if not callable(target):
        raise RewardFunctionError(f"reward function '{spec}': '{attribute}' is a {type(target).__name__}, not a "
                                  f"function; point the spec at a function fn(prompts, completions, **columns)")
    return target


class _CallPlan:
    """How to call one function: by keyword (TRL's way) or positionally, and which columns it takes."""

    def __init__(self, fn: Callable[..., Any], name: str):
        try:
            params = inspect.signature(fn).parameters
        except ValueError:  # a builtin without a signature: call it TRL's way and trust it
            self.by_keyword, self.accepted, self.required = True, None, set()
            return
        accepts_any = any(p.kind == p.VAR_KEYWORD for p in params.values())
        # TRL calls fn(prompts=..., completions=..., **columns), so functions written for it, such as
        # fn(completions, **kwargs), must get keywords; a function naming neither gets them positionally.
        self.by_keyword = accepts_any or "completions" in params
        probe = {"prompts": [], "completions": []}
        try:
            if self.by_keyword:
                inspect.signature(fn).bind_partial(**probe)
            else:
                inspect.signature(fn).bind_partial([], [])
        except TypeError as error:
            raise RewardFunctionError(f"reward function '{name}': cannot be called as fn(prompts, completions, "
                                      f"**columns) ({error}); give it that signature") from error
        named = [p for p in params.values() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
        if not self.by_keyword:
            named = named[2:]
        named = [p for p in named if p.name not in probe]
        self.required = {p.name for p in named if p.default is p.empty}
        self.accepted = None if accepts_any else {p.name for p in named}

    def call(self, fn: Callable[..., Any], prompts: list[Any], completions: list[Any],
             columns: dict[str, list[Any]]) -> Any:
        """Call ``fn`` with the columns it accepts."""
        kwargs = {k: v for k, v in columns.items() if self.accepted is None or k in self.accepted}
        if self.by_keyword:
            return fn(prompts=prompts, completions=completions, **kwargs)
        return fn(prompts, completions, **kwargs)


def prompts_and_columns(records: Sequence[dict[str, Any]]) -> tuple[list[Any], dict[str, list[Any]]]:
    """``records`` (one per completion) -> (prompts, {column: values}); a column a record lacks is None there."""
    names: dict[str, None] = {}
    for record in records:
        names.update(dict.fromkeys(k for k in record if k != "prompt"))
    prompts = [record.get("prompt") for record in records]
    return prompts, {name: [record.get(name) for record in records] for name in names}


class RewardFunctions:
    """Weighted Python reward functions, resolved at start-up and called once per batch.

    ``specs``: import paths (or callables, e.g. a reward-model scorer the trainer builds); ``weights``:
    one per function, all 1.0 when None. ``names`` are the functions' ``__name__`` (made unique), used
    in metric keys.
    """

    def __init__(self, specs: Sequence[str | Callable[..., Any]], weights: Sequence[float] | None = None):
        specs = list(specs)
        if not specs:
            raise RewardFunctionError("reward functions: none given; name at least one, e.g. "
                                      "grpo.reward_funcs=[aligner.algorithms.rewards:accuracy]")
        if weights is None:
            weights = [1.0] * len(specs)
        weights = [float(w) for w in weights]
        if len(weights) != len(specs):
            raise RewardFunctionError(f"reward functions: {len(specs)} functions but {len(weights)} weights; give "
                                      f"one weight per function, in the same order (or no weights: all 1.0)")
        bad = [i for i, w in enumerate(weights) if not math.isfinite(w)]
        if bad:
            raise RewardFunctionError(f"reward functions: weight {weights[bad[0]]} at index {bad[0]} is not finite; "
                                      f"give finite weights")
        self.functions = [resolve_reward_function(s) if isinstance(s, str) else s for s in specs]
        self.names: list[str] = []
        for spec, fn in zip(specs, self.functions):
            if not callable(fn):
                raise RewardFunctionError(f"reward function {spec!r}: not callable; pass an import path or a function")
            base = getattr(fn, "__name__", None) or type(fn).__name__
            name = base if base not in self.names else f"{base}_{len(self.names)}"
            self.names.append(name)
        self._plans = [_CallPlan(fn, name) for fn, name in zip(self.functions, self.names)]
        self.weights = torch.tensor(weights, dtype=torch.float32)  # [F]

    def check_columns(self, column_names: Sequence[str]) -> None:
        """Fail now, naming the function and the column, if a function requires a column the data lacks."""
        have = set(column_names) - {"prompt"}
        for name, plan in zip(self.names, self._plans):
            missing = sorted(plan.required - have)
            if missing:
                raise RewardFunctionError(
                    f"reward function '{name}' requires the column '{missing[0]}', which the prompt records lack "
                    f"(they have: {', '.join(sorted(have)) or 'only prompt'}); add it to the data or drop the "
                    f"function")

    def __call__(self, prompts: Sequence[Any], completions: Sequence[Any],
                 columns: dict[str, Sequence[Any]] | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Score a batch: ``N`` prompts, completions and column values -> (weighted total ``[N]``, ``{name: [N]}``).

        Per-function tensors hold NaN where the function returned None; the total is the NaN-skipping
        weighted sum (0 where no function applied). Float32 on the CPU.
        """
        columns = dict(columns or {})
        n = len(completions)
        if len(prompts) != n:
            raise RewardFunctionError(f"reward functions: {len(prompts)} prompts for {n} completions; pass one "
                                      f"prompt per completion (repeat a prompt for each of its samples)")
        for column, values in columns.items():
            if len(values) != n:
                raise RewardFunctionError(f"reward functions: column '{column}' has {len(values)} values for {n} "
                                          f"completions; align every column with the completions")
        per_function: dict[str, torch.Tensor] = {}
        columns = {k: list(v) for k, v in columns.items()}
        for name, fn, plan in zip(self.names, self.functions, self._plans):
            try:
                values = plan.call(fn, list(prompts), list(completions), columns)
            except RewardFunctionError:
                raise
            except Exception as error:
                raise RewardFunctionError(
                    f"reward function '{name}' raised {type(error).__name__}: {error} (called with {n} completions "
                    f"and columns: {', '.join(columns) or 'none'}); fix the function or the data") from error
            per_function[name] = self._as_tensor(name, values, n)
        stacked = torch.stack([per_function[name] for name in self.names], dim=1)  # [N, F]
        applicable = ~torch.isnan(stacked)
        total = torch.where(applicable, stacked * self.weights, torch.zeros(())).sum(dim=1)  # [N]
        none_applied = (~applicable.any(dim=1)).nonzero().flatten()
        if none_applied.numel():
            warnings.warn(f"reward functions: no function returned a reward for {none_applied.numel()} of {n} "
                          f"completions (first at index {none_applied[0].item()}); they score 0. Make sure at "
                          f"least one function applies to every sample", stacklevel=2)
        return total, per_function

    @staticmethod
    def _as_tensor(name: str, values: Any, n: int) -> torch.Tensor:
        """Check one function's output and return it as ``[N]`` float32 with NaN for None."""
        if not isinstance(values, (list, tuple)) and hasattr(values, "tolist"):  # a tensor or numpy array
            values = values.tolist()
        if not isinstance(values, (list, tuple)):
            raise RewardFunctionError(f"reward function '{name}' returned a {type(values).__name__}; return a list "
                                      f"with one float (or None) per completion")
        if len(values) != n:
            raise RewardFunctionError(f"reward function '{name}' returned {len(values)} values for {n} completions; "
                                      f"return exactly one float (or None) per completion, in order")
        out = []
        for index, value in enumerate(values):
            if value is None:
                out.append(math.nan)
                continue
            if not isinstance(value, numbers.Real) and hasattr(value, "item"):  # numpy / 0-d tensor scalars
                value = value.item()
            if not isinstance(value, numbers.Real):
                raise RewardFunctionError(f"reward function '{name}' returned {value!r} ({type(value).__name__}) at "
                                          f"index {index}; return a float, or None where it does not apply")
            value = float(value)
            if math.isinf(value):
                raise RewardFunctionError(f"reward function '{name}' returned {value} at index {index}; return a "
                                          f"finite float, or None where it does not apply")
            out.append(value)
        return torch.tensor(out, dtype=torch.float32)


def reward_function_metrics(per_function: dict[str, torch.Tensor]) -> dict[str, float]:
    """``rewards/{name}/mean`` and ``rewards/{name}/std`` (Bessel) over the applicable samples of each function.

    A function that applied to no sample gets no keys; one that applied to one sample has std 0.
    """
    metrics: dict[str, float] = {}
    for name, values in per_function.items():
        kept = values[~torch.isnan(values)].double()
        if kept.numel() == 0:
            continue
        metrics[f"rewards/{name}/mean"] = kept.mean().item()
        metrics[f"rewards/{name}/std"] = kept.std().item() if kept.numel() > 1 else 0.0
    return metrics
