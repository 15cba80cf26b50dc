"""``python -m export.hf CKPT --out DIR``: the folded model as a stock transformers folder.

    python -m export.hf runs/my_lora --out exported/my_model
    python -m export.hf runs/my_lora --out exported/my_model --max-shard-size 2GB --overwrite

For serving engines that load plain transformers folders (vLLM, TGI, llama.cpp's converter). Only checkpoints whose
every adapted layer folds completely (the fold leaves no residual) can be written this way; a checkpoint whose fold
keeps an input-dependent path is refused before anything is written (``python -m export.onnx CKPT --merge`` ships
that path as a small graph next to the folded layer).

Steps: load the checkpoint onto its untouched base model; fold the first adapted layer to learn whether the method
leaves a residual; run the unfolded model on fixed random inputs (batch 1 x 5 and 3 x 11, the encoder's last row
padded) and, for decoders, decode 10 greedy tokens, keeping only those outputs; fold every layer in place (each
fold checked against its layer); write sharded safetensors in the base model's dtype, config.json,
generation_config.json (decoders) and the base model's tokenizer into a temporary folder beside ``--out``; free
the model; load the folder with ``AutoModelFor*.from_pretrained`` (no adapter code) and compare its logits with the
kept outputs at ``surgery.tolerances.MODEL[dtype]`` and its greedy tokens (identical, or diverging only where the
unfolded model's top two scores were within that tolerance); only then rename it to ``--out``, with
``export_hf_report.json`` inside.

Exit status: 0 when the folder was written and verified; 1 when a check failed (a layer's fold, parity, greedy
decoding, the folder's keys or dtype): nothing is left behind and an existing ``--out`` is untouched; 2 when the
inputs cannot be used (checkpoint, base model, a method that leaves a residual, a dtype without a tolerance, a bad
``--out`` or ``--max-shard-size``).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import re
import shutil
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, PreTrainedModel

from export.exporters import CAUSAL_LM, SEQ_CLS
from export.fold import FoldError, LayerFold, dtype_name, fold_in_place, fold_layer
from export.onnx import MODEL_PATH_HELP, TOKENIZER_FILES, Log, Steps, model_dtype
from export.outdir import OutFolderError, few, refuse_non_folder
from export.reference import GREEDY_SHAPE, PARITY_SHAPES, main_output, pad_id, sample_inputs
from export.verify import Difference, compare, greedy_comparison, rule
from surgery.checkpoint import CONFIG_FILE, CheckpointError, load_checkpoint, read_manifest
from surgery.config import ConfigError, ModelConfig, SurgeryConfig, load_config
from surgery.model import ModelLoadError, resolve_model_path
from surgery.rewrite import adapter_layers
from surgery.targets import TargetError
from surgery.tolerances import MODEL, Tolerance

REPORT_FILE = "export_hf_report.json"
DEFAULT_MAX_SHARD_SIZE = "5GB"
GREEDY_TOKENS = 10
PARITY_SEED, GREEDY_SEED, FOLD_SEED = 2024, 7, 0
NAMED = 3  # names shown in a refusal; the rest are counted
AUTO_CLASSES: dict[str, type] = {CAUSAL_LM: AutoModelForCausalLM, SEQ_CLS: AutoModelForSequenceClassification}
SIZE_UNITS = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}  # huggingface_hub's units


class ResidualError(ValueError):
    """A checkpoint whose fold keeps an input-dependent path, which a stock transformers folder cannot hold."""


class VerificationFailed(RuntimeError):
    """The written folder does not reproduce the unfolded model; nothing was left behind."""

    def __init__(self, message: str, report: dict[str, Any]) -> None:
        super().__init__(message)
        self.report = report


USER_ERRORS = (CheckpointError, ModelLoadError, ConfigError, TargetError, ResidualError, OutFolderError,
               OSError, ValueError)


@dataclass
class Reference:
    """The unfolded model's outputs, kept instead of the model: logits per parity input, greedy tokens (decoders)."""

    inputs: list[dict[str, torch.Tensor]]  # input_ids, attention_mask: (batch, seq)
    logits: list[np.ndarray]  # seq-cls: (batch, labels); causal-lm: (batch, seq, vocab)
    greedy_prompt: torch.Tensor | None  # (batch, seq)
    greedy_tokens: np.ndarray | None  # (batch, GREEDY_TOKENS)
    greedy_scores: np.ndarray | None  # (GREEDY_TOKENS, batch, vocab): what each token was the argmax of
    greedy_kwargs: dict[str, Any]


# ---- the pipeline -------------------------------------------------------------------------------------------------
def export_hf(
    ckpt: str | Path,
    out: str | Path,
    *,
    model_path: str | None = None,
    max_shard_size: str = DEFAULT_MAX_SHARD_SIZE,
    overwrite: bool = False,
    log: Log = print,
) -> dict[str, Any]:
    """Fold ``ckpt`` into a plain transformers folder at ``out``, verified by reloading it; returns the report.

    Raises :class:`ResidualError`, :class:`OutFolderError`, CheckpointError, ModelLoadError or ValueError for unusable
    inputs (before anything is written), :class:`FoldError` for a layer whose fold is off and
    :class:`VerificationFailed` when the reloaded folder differs; in every failure ``out`` is left as it was.
    """
    ckpt, out = Path(ckpt), Path(out)
    shard_bytes = parse_shard_size(max_shard_size)
    config = checkpoint_config(ckpt, model_path)
    check_out(out, overwrite, protected={"the checkpoint": ckpt, "the base model": base_folder(config.model)})
    dtype = getattr(torch, config.model.dtype)
    tolerance = parity_tolerance(dtype, ckpt)
    step = Steps(log, total=6)
    step("loading the checkpoint",
         f"{ckpt} ({config.method.name} on {config.model.name_or_path}, {config.model.dtype})")
    model = load_checkpoint(ckpt, model_path=model_path).model.eval()
    step("checking that the adapters fold completely", f"{len(adapter_layers(model))} adapted layers")
    refuse_residuals(model, ckpt)
    step("running the unfolded model", f"parity inputs {PARITY_SHAPES}"
         + (f", {GREEDY_TOKENS} greedy tokens" if config.model.task == CAUSAL_LM else ""))
    reference = reference_outputs(model, config.model.task)
    step("folding in place", "each adapter layer replaced by its fold")
    layers = fold_every_layer(model, ckpt)
    step("writing", f"safetensors in {dtype_name(dtype)}, shards of at most {max_shard_size}, into {out}")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.partial-"))
    try:
        write_folder(model, config.model, staging, shard_bytes, out, step.detail)
        # One copy of the weights at a time: the folded model goes before the written folder is loaded back.
        del model
        gc.collect()
        step("verifying", f"{staging.name} loaded with {AUTO_CLASSES[config.model.task].__name__} against the "
                          f"unfolded model at atol {tolerance.atol:g} / rtol {tolerance.rtol:g}")
        report = base_report(ckpt, config, dtype, max_shard_size, layers)
        report.update(verify_folder(staging, config.model, reference, tolerance, dtype))
        if report["errors"]:
            raise VerificationFailed("; ".join(report["errors"]), report)
        report["passed"] = True
        report["files"] = sorted(path.name for path in staging.iterdir()) + [REPORT_FILE]
        (staging / REPORT_FILE).write_text(json.dumps(report, indent=2, default=str) + "\n")
        move_into_place(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    step.done(out)
    return report


# ---- checks before any weight is loaded ---------------------------------------------------------------------------
def parse_shard_size(size: str) -> int:
    """'5GB' -> 5_000_000_000 (units KB, MB, GB, TB as huggingface_hub reads them) or a plain byte count."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]B)?\s*", size, flags=re.IGNORECASE)
    if match is None or float(match[1]) <= 0:
        raise ValueError(f"--max-shard-size {size!r}: give a positive size such as 5GB, 500MB or 2000000 (bytes)")
    return int(float(match[1]) * SIZE_UNITS[match[2].upper()] if match[2] else float(match[1]))


def checkpoint_config(ckpt: Path, model_path: str | None) -> SurgeryConfig:
    """The checkpoint's resolved config (``model_path`` replacing the base's location), from its files only."""
    read_manifest(ckpt)  # a missing, truncated or corrupted checkpoint fails here, with its own message
    try:
        config = load_config(ckpt / CONFIG_FILE)
        if model_path is not None:
            config = load_config(ckpt / CONFIG_FILE,
                                 overrides={"model": {**config.model.model_dump(), "name_or_path": model_path}})
        return config
    except ConfigError as error:
        raise CheckpointError(f"{ckpt / CONFIG_FILE}: {error}") from None


def base_folder(model: ModelConfig) -> Path | None:
    path = Path(resolve_model_path(model.name_or_path))
    return path if path.is_dir() else None


def check_out(out: Path, overwrite: bool, protected: dict[str, Path | None]) -> None:
    """Refuse an ``--out`` that is a file, that holds files (unless ``overwrite``) or that would replace or contain
    one of the ``protected`` folders (even with ``overwrite``)."""
    refuse_non_folder(out)
    for what, folder in protected.items():
        if folder is not None and (out.resolve() == folder.resolve() or out.resolve() in folder.resolve().parents):
            raise OutFolderError(f"--out {out}: would replace {what} ({folder}); choose another folder")
    entries = sorted(path.name for path in out.iterdir()) if out.is_dir() else []
    if entries and not overwrite:
        raise OutFolderError(f"--out {out}: the folder is not empty ({few(entries, NAMED)}); pass --overwrite to "
                             f"replace it once the new export has passed verification, or choose another folder")


def parity_tolerance(dtype: torch.dtype, ckpt: Path) -> Tolerance:
    """MODEL[dtype]: the reloaded folder and the unfolded model both compute in the base model's dtype."""
    if dtype not in MODEL:
        raise ValueError(
            f"{ckpt / CONFIG_FILE}: model.dtype is {dtype_name(dtype)}, and surgery/tolerances.py has no MODEL "
            f"tolerance for it, so the written folder could not be verified; nothing was written. Add a MODEL entry "
            f"for {dtype_name(dtype)} with its reason, or export a checkpoint trained on a "
            f"{' or '.join(dtype_name(d) for d in MODEL)} base"
        )
    return MODEL[dtype]


# ---- fold ---------------------------------------------------------------------------------------------------------
def refuse_residuals(model: nn.Module, ckpt: Path) -> None:
    """Fold the first adapter layer (and drop the result) to learn, before anything else runs, whether the method
    leaves an input-dependent residual; the fold loop still checks every layer."""
    layers = adapter_layers(model)
    if not layers:
        return
    name, layer = next(iter(layers.items()))
    _, record = fold_layer(name, layer, torch.Generator().manual_seed(FOLD_SEED))
    if record.residual is not None:
        raise ResidualError(residual_message(model, name, record, ckpt))


def fold_every_layer(model: nn.Module, ckpt: Path) -> list[LayerFold]:
    """``export.fold.fold_in_place`` (one layer's new weight at a time), stopping at a layer with a residual path."""

    def refuse(name: str, record: LayerFold) -> None:
        if record.residual is not None:
            raise ResidualError(residual_message(model, name, record, ckpt))

    return fold_in_place(model, seed=FOLD_SEED, before_replacing=refuse)


def residual_message(model: nn.Module, name: str, record: LayerFold, ckpt: Path) -> str:
    kind = type(model.get_submodule(name))
    same = [n for n, layer in adapter_layers(model).items() if type(layer) is kind]
    return (
        f"{ckpt}: layer {name!r} ({record.method}) keeps an input-dependent path after folding: {record.residual}. "
        f"A stock transformers folder holds only the base architecture's weights and cannot carry it; "
        f"{len(same)} adapted layer(s) use this adapter ({few(same, NAMED)}). Nothing was written. Export with "
        f"`python -m export.onnx {ckpt} --merge` instead: it folds the static part and ships the residual as a "
        f"small graph next to each folded layer"
    )


# ---- reference outputs --------------------------------------------------------------------------------------------
def reference_outputs(model: nn.Module, task: str) -> Reference:
    """The unfolded model's logits on the parity inputs and, for decoders, its greedy tokens."""
    vocab = int(model.config.vocab_size)
    inputs = [parity_input(vocab, batch, seq, PARITY_SEED + i, pad=task != CAUSAL_LM)
              for i, (batch, seq) in enumerate(PARITY_SHAPES)]
    logits = [main_output(model, feed, task) for feed in inputs]
    if task != CAUSAL_LM:
        return Reference(inputs, logits, None, None, None, {})
    batch, seq = GREEDY_SHAPE
    prompt = torch.from_numpy(sample_inputs(vocab, batch, seq, GREEDY_SEED)["input_ids"])
    kwargs = dict(attention_mask=torch.ones_like(prompt), do_sample=False, num_beams=1, max_new_tokens=GREEDY_TOKENS,
                  min_new_tokens=GREEDY_TOKENS, pad_token_id=pad_id(model))
    return Reference(inputs, logits, prompt, *greedy(model, prompt, kwargs), kwargs)


def parity_input(vocab: int, batch: int, seq: int, seed: int, pad: bool) -> dict[str, torch.Tensor]:
    arrays = sample_inputs(vocab, batch, seq, seed, pad_last_row=pad)
    return {key: torch.from_numpy(arrays[key]) for key in ("input_ids", "attention_mask")}


def greedy(model: nn.Module, prompt: torch.Tensor, kwargs: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """Greedy decoding: the (batch, GREEDY_TOKENS) new tokens and the (GREEDY_TOKENS, batch, vocab) scores each
    token was the argmax of."""
    with torch.no_grad():
        out = model.generate(prompt, **kwargs, output_scores=True, return_dict_in_generate=True)
    return out.sequences[:, prompt.shape[1]:].numpy(), torch.stack(out.scores).float().numpy()


# ---- writing ------------------------------------------------------------------------------------------------------
def write_folder(model: nn.Module, base: ModelConfig, folder: Path, shard_bytes: int, out: Path, log: Log) -> None:
    """Weights (sharded safetensors in the model's dtype), config.json, generation_config.json for models that
    generate, and the base model's tokenizer."""
    assert isinstance(model, PreTrainedModel), type(model)
    model.save_pretrained(folder, max_shard_size=shard_bytes)
    shards = sorted(folder.glob("*.safetensors"))
    log(f"{len(shards)} safetensors file(s), {sum(p.stat().st_size for p in shards) / 1e6:.1f} MB")
    save_base_tokenizer(base, folder, out, log)


def save_base_tokenizer(base: ModelConfig, folder: Path, out: Path, log: Log) -> None:
    """The base model's tokenizer as it is (no pad token added); a warning when the base has none."""
    source = resolve_model_path(base.name_or_path)
    if Path(source).is_dir() and not any((Path(source) / name).is_file() for name in TOKENIZER_FILES):
        log(f"warning: {source} has no tokenizer files; copy the tokenizer the model was trained with into {out}")
        return
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=base.trust_remote_code)
    except (OSError, ValueError) as error:
        log(f"warning: no tokenizer saved (cannot load one from {source!r}: {error}); copy it into {out}")
        return
    tokenizer.save_pretrained(folder)


def move_into_place(staging: Path, out: Path) -> None:
    """Rename the verified folder to ``out``; an existing ``out`` (checked: empty, or --overwrite) goes only now."""
    # mkdtemp makes the folder owner-only and safetensors writes its files 0600: a served model is read by the
    # server's user, so make it readable by all, as the checkpoint's files are.
    os.chmod(staging, 0o755)
    for path in staging.iterdir():
        os.chmod(path, 0o644)
    if not out.exists():
        os.replace(staging, out)
        return
    retired = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.replaced-"))
    os.replace(out, retired)  # onto the empty folder mkdtemp made
    os.replace(staging, out)
    shutil.rmtree(retired)


# ---- verification -------------------------------------------------------------------------------------------------
def verify_folder(folder: Path, base: ModelConfig, reference: Reference, tolerance: Tolerance,
                  dtype: torch.dtype) -> dict[str, Any]:
    """Load ``folder`` as a plain transformers model and compare it with the kept outputs; the report's
    ``loading``, ``parity``, ``greedy`` and ``errors`` entries."""
    auto = AUTO_CLASSES[base.task]
    model, info = auto.from_pretrained(folder, dtype="auto", trust_remote_code=base.trust_remote_code,
                                       output_loading_info=True)
    model.eval()
    errors = loading_errors(folder, info, model_dtype(model), dtype)
    cases = [compare(f"batch {feed['input_ids'].shape[0]} x seq {feed['input_ids'].shape[1]}",
                     main_output(model, feed, base.task), expected, tolerance,
                     feed["attention_mask"].numpy() if base.task == CAUSAL_LM else None)
             for feed, expected in zip(reference.inputs, reference.logits, strict=True)]
    errors += [parity_failure(case, tolerance) for case in cases if not case.within]
    greedy_section = None
    if reference.greedy_prompt is not None and reference.greedy_tokens is not None:
        tokens, _ = greedy(model, reference.greedy_prompt, reference.greedy_kwargs)
        greedy_section = greedy_comparison(tokens, reference.greedy_tokens, reference.greedy_scores, tolerance)
        if not greedy_section["passed"]:
            errors.append(f"greedy decoding of the reloaded folder differs from the unfolded model beyond a near-tie: "
                          f"{greedy_section}")
    return {
        "loading": {key: sorted(map(str, info.get(key) or [])) for key in ("missing_keys", "unexpected_keys",
                                                                          "mismatched_keys")},
        "parity": {
            "tolerance": {**asdict(tolerance), "rule": rule(tolerance, "reloaded", "unfolded")},
            "max_abs_diff": max(case.max_abs_diff for case in cases),
            "max_rel_diff": max(case.max_rel_diff for case in cases),
            "cases": [asdict(case) for case in cases],
        },
        "greedy_match": None if greedy_section is None else greedy_section["match"],
        "greedy": greedy_section,
        "errors": errors,
    }


def loading_errors(folder: Path, info: dict[str, Any], loaded: torch.dtype, expected: torch.dtype) -> list[str]:
    """The folder must load with no missing, unexpected or mismatched key, in the base model's dtype."""
    errors = [f"{folder.name}: from_pretrained reports {key} {sorted(map(str, info[key]))[:5]}"
              for key in ("missing_keys", "unexpected_keys", "mismatched_keys") if info.get(key)]
    if loaded != expected:
        errors.append(f"{folder.name}: loads as {dtype_name(loaded)}, expected the base model's {dtype_name(expected)}")
    return errors


def parity_failure(case: Difference, tolerance: Tolerance) -> str:
    return (f"the reloaded folder differs from the unfolded model at {case.case}: max |diff| {case.max_abs_diff:.3g}, "
            f"max rel {case.max_rel_diff:.3g} (tolerance atol {tolerance.atol:g}, rtol {tolerance.rtol:g}: "
            f"{tolerance.reason})")


# ---- report -------------------------------------------------------------------------------------------------------
def base_report(ckpt: Path, config: SurgeryConfig, dtype: torch.dtype, max_shard_size: str,
                layers: list[LayerFold]) -> dict[str, Any]:
    fold_errors = [layer.fold_error for layer in layers if layer.fold_error is not None]
    return {
        "passed": False,
        "checkpoint": str(ckpt),
        "base_model": config.model.name_or_path,
        "method": config.method.name,
        "task": config.model.task,
        "dtype": dtype_name(dtype),
        "max_shard_size": max_shard_size,
        "layers_folded": len(layers),
        "max_fold_error": max(fold_errors, default=None),
        "layers": [layer.as_dict() for layer in layers],
        "versions": versions(),
    }


def versions() -> dict[str, str]:
    import safetensors
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "safetensors": safetensors.__version__, "numpy": np.__version__}


# ---- command line -------------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m export.hf", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("checkpoint", type=Path, help="checkpoint folder written by surgery/training "
                        "(adapter.safetensors, surgery.yaml, checkpoint.json)")
    parser.add_argument("--out", type=Path, required=True,
                        help="the folder to write; must not exist or be empty unless --overwrite")
    parser.add_argument("--model-path", help=MODEL_PATH_HELP)
    parser.add_argument("--max-shard-size", default=DEFAULT_MAX_SHARD_SIZE,
                        help=f"largest safetensors shard, e.g. 2GB or 500MB (default {DEFAULT_MAX_SHARD_SIZE})")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a non-empty --out, only after the new folder has passed verification")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        report = export_hf(args.checkpoint, args.out, model_path=args.model_path,
                           max_shard_size=args.max_shard_size, overwrite=args.overwrite)
    except (VerificationFailed, FoldError) as failure:
        print(f"error: {failure}; nothing was written", file=sys.stderr)
        return 1
    except USER_ERRORS as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(summary(report))
    return 0


def summary(report: dict[str, Any]) -> str:
    parity, greedy_section = report["parity"], report["greedy"]
    if greedy_section is None:
        decoding = "no greedy check (not a decoder)"
    elif greedy_section["match"]:
        decoding = f"{greedy_section['tokens']} greedy tokens identical"
    else:
        decoding = f"greedy tokens identical up to {len(greedy_section['divergences'])} near-tie(s)"
    return (f"export passed: {report['layers_folded']} layers folded, {report['dtype']}, max |diff| "
            f"{parity['max_abs_diff']:.3g} (atol {parity['tolerance']['atol']:g}), {decoding}")


if __name__ == "__main__":
    sys.exit(main())
