"""Run an exported folder: classify, generate or embed text with onnxruntime.

    python -m export.run DIR --text "..." [--text-pair "..."] [--provider cpu|cuda|tensorrt] [--max-new-tokens N]
    python -m export.run DIR --adapter NAME --text "..."     # an --adapters export with NAME.onnx_adapter active

DIR holds ``model.onnx`` (or optimum's ``decoder_*.onnx`` files), ``config.json``, the tokenizer files and optionally
``generation_config.json`` and ``export_report.json``. The task comes from the report's ``task``, else from
``config.json``'s architectures, else from the graph's outputs. Causal LMs decode greedily with
``export.decode.greedy``: with the KV cache when the graph has one (inputs ``past_key_values.*``, optimum's naming),
else re-reading the whole sequence each step. No optimum needed.

Inputs longer than the model's positions (``n_positions`` or ``max_position_embeddings`` in ``config.json``) are never
run past them. Encoders truncate such a text to the limit (also to the tokenizer's ``model_max_length`` when that is
smaller) with a ``TruncationWarning`` naming the limit and how many tokens were cut. Decoders refuse a prompt that
leaves no room to generate, or whose tokens plus ``--max-new-tokens`` exceed the positions, with an
``InputTooLongError`` naming both numbers: the command line prints it as one ``error:`` line and exits 2, before
generating for any ``--text``.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

import numpy as np
import onnxruntime as ort
from transformers import AutoConfig, AutoTokenizer, GenerationConfig
from transformers.tokenization_utils_base import VERY_LARGE_INTEGER

from export.adapters import AdapterSession, available, load_adapter
from export.decode import FeedError, greedy, has_cache, onnx_feed
from export.latency import PROVIDERS, ProviderError, ort_session, provider_chain
from surgery.config import model_positions

SEQ_CLS, CAUSAL_LM, FEATURES = "seq-cls", "causal-lm", "feature-extraction"

# Task names an export report may carry (ours, and optimum's) -> the pipeline's task.
REPORT_TASKS = {
    "seq-cls": SEQ_CLS, "text-classification": SEQ_CLS, "sequence-classification": SEQ_CLS,
    "causal-lm": CAUSAL_LM, "text-generation": CAUSAL_LM, "text-generation-with-past": CAUSAL_LM,
    "feature-extraction": FEATURES, "default": FEATURES,
}

# Where to look for the graph, in order. optimum-onnx writes model.onnx; older optimum wrote decoder_* files.
MODEL_FILES = {
    SEQ_CLS: ("model.onnx",),
    FEATURES: ("model.onnx",),
    CAUSAL_LM: ("model.onnx", "decoder_model_merged.onnx", "decoder_with_past_model.onnx", "decoder_model.onnx"),
}
# A folder has a tokenizer when it has one of these (fast tokenizer, its config, or a slow tokenizer's vocabulary).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "tokenizer.model",
                   "spiece.model", "sentencepiece.bpe.model")


class ExportFolderError(ValueError):
    """The folder is missing a file, or its model does not fit the requested use."""


class InputTooLongError(ValueError):
    """A decoder's prompt, with the tokens to generate, does not fit the model's positions."""


class TruncationWarning(UserWarning):
    """An encoder's input was cut to the model's positions."""


class Limit(NamedTuple):
    """The most tokens one sequence may have, and where that number comes from (for messages)."""

    tokens: int
    source: str


def position_limit(config) -> Limit | None:
    """The positions config.json gives the model (less RoBERTa's padding offset), or None where it names none: the
    same reading as training's max_length check (surgery.config.model_positions)."""
    found = model_positions(config)
    return None if found is None else Limit(*found)


def encoder_limit(positions: Limit | None, tokenizer) -> Limit | None:
    """The smaller of the model's positions and the tokenizer's model_max_length (when it sets one)."""
    tokenizer_max = getattr(tokenizer, "model_max_length", None)
    if not isinstance(tokenizer_max, int) or tokenizer_max >= VERY_LARGE_INTEGER:
        return positions
    if positions is None or tokenizer_max < positions.tokens:
        return Limit(tokenizer_max, "model_max_length in tokenizer_config.json")
    return positions


def check_room(limit: Limit | None, prompt_tokens: int, max_new_tokens: int) -> None:
    """Raise InputTooLongError unless the prompt and the tokens to generate fit the positions together."""
    if limit is None:
        return
    if prompt_tokens >= limit.tokens:
        raise InputTooLongError(
            f"the prompt is {prompt_tokens} tokens and the model has {limit.tokens} positions ({limit.source}), "
            f"which leaves no room to generate; shorten the text to fewer than {limit.tokens} tokens"
        )
    if prompt_tokens + max_new_tokens > limit.tokens:
        raise InputTooLongError(
            f"the prompt's {prompt_tokens} tokens + {max_new_tokens} new tokens (--max-new-tokens) exceed the "
            f"model's {limit.tokens} positions ({limit.source}); shorten the text or lower --max-new-tokens to "
            f"{limit.tokens - prompt_tokens}"
        )


def declared_task(folder: Path, config) -> str | None:
    """The task export_report.json or config.json's architectures name, or None if neither does."""
    report_path = folder / "export_report.json"
    if report_path.is_file():
        reported = json.loads(report_path.read_text()).get("task")
        if reported is not None:
            if reported not in REPORT_TASKS:
                raise ExportFolderError(f"{report_path}: unknown task {reported!r}; known: {sorted(REPORT_TASKS)}")
            return REPORT_TASKS[reported]
    for architecture in getattr(config, "architectures", None) or []:
        if architecture.endswith("ForSequenceClassification"):
            return SEQ_CLS
        if architecture.endswith(("ForCausalLM", "LMHeadModel")):
            return CAUSAL_LM
        if architecture.endswith("Model"):
            return FEATURES
    return None


def task_from_outputs(folder: Path, outputs: list[ort.NodeArg]) -> str:
    """last_hidden_state: feature extraction; logits (batch, seq, vocab): causal LM; logits (batch, labels): seq-cls."""
    ranks = {output.name: len(output.shape) for output in outputs}
    if "last_hidden_state" in ranks:
        return FEATURES
    if "logits" in ranks:
        return CAUSAL_LM if ranks["logits"] == 3 else SEQ_CLS
    raise ExportFolderError(
        f"{folder}: cannot tell the task; add 'task' to export_report.json or 'architectures' to config.json"
    )


def find_model_file(folder: Path, task: str) -> Path:
    for name in MODEL_FILES[task]:
        if (folder / name).is_file():
            return folder / name
    found = sorted(p.name for p in folder.glob("*.onnx"))
    raise ExportFolderError(f"{folder}: no {' or '.join(MODEL_FILES[task])} for task {task} (found: {found or 'none'})")


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


class OnnxPipeline:
    """Tokenizer + onnxruntime session(s) of one exported folder."""

    def __init__(self, folder: Path, task: str, config, tokenizer, model_file: Path, provider: str = "cpu",
                 adapter: str | None = None):
        self.folder, self.task, self.config, self.tokenizer = folder, task, config, tokenizer
        self.model_file, self.provider = model_file, provider
        self.adapters = available(folder)  # an --adapters export: name -> NAME.onnx_adapter (else empty)
        options = None
        if self.adapters:  # without onnxruntime's warning per overridable initializer
            options = ort.SessionOptions()
            options.log_severity_level = 3
        self.graph_session = ort_session(model_file, provider, options)
        self.session = self.graph_session
        self._loaded: dict[str, ort.LoraAdapter] = {}
        self.adapter: str | None = None
        self.use_adapter(adapter)
        self.cached = has_cache(self.session)  # a KV cache: generation feeds one token a step
        self.positions = position_limit(config)  # None: config.json names no limit, nothing is checked

    @classmethod
    def from_dir(cls, folder: str | Path, provider: str = "cpu", adapter: str | None = None) -> OnnxPipeline:
        folder = Path(folder)
        if not folder.is_dir():
            raise FileNotFoundError(f"export folder {folder} does not exist")
        if not (folder / "config.json").is_file():
            raise ExportFolderError(f"{folder} has no config.json; export with the model's config next to the graph")
        provider_chain(provider)  # fail on an unknown provider before any loading
        config = AutoConfig.from_pretrained(folder)
        if not any((folder / name).is_file() for name in TOKENIZER_FILES):
            raise ExportFolderError(f"{folder} has no tokenizer files ({', '.join(TOKENIZER_FILES[:2])}, ...); "
                                    "save the tokenizer into it (tokenizer.save_pretrained(folder))")
        try:
            tokenizer = AutoTokenizer.from_pretrained(folder)
        except (OSError, ValueError) as err:
            raise ExportFolderError(f"{folder}: the tokenizer does not load ({err})") from err
        task = declared_task(folder, config)
        if task is None:  # only the graph can tell
            candidates = sorted(folder.glob("*.onnx"))
            if not candidates:
                raise ExportFolderError(f"{folder} has no .onnx file")
            task = task_from_outputs(folder, ort_session(candidates[0], provider).get_outputs())
        model_file = find_model_file(folder, task)
        return cls(folder, task, config, tokenizer, model_file, provider, adapter)

    def use_adapter(self, name: str | None) -> None:
        """Run the following calls with adapter ``name`` of an ``--adapters`` export active (each file is read once),
        or with none (None: the base model). A batch never mixes adapters. Unknown names are an ExportFolderError
        listing the folder's adapters."""
        if name is not None and name not in self.adapters:
            known = ", ".join(sorted(self.adapters)) or "none: it is not an --adapters export"
            raise ExportFolderError(f"{self.folder}: no adapter {name!r} (adapters: {known})")
        if name is not None and name not in self._loaded:
            self._loaded[name] = load_adapter(self.adapters[name])
        self.adapter = name
        self.session = self.graph_session if name is None else AdapterSession(self.graph_session, self._loaded[name])

    # -- feeding the graph ---------------------------------------------------------------------------------------

    def _feed(self, encoded: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The declared inputs, from the tokenizer's output; token_type_ids default to 0, position_ids follow the
        attention mask (as transformers computes them)."""
        mask = encoded.get("attention_mask", np.ones_like(encoded["input_ids"]))
        try:
            return onnx_feed(self.session, {**encoded, "attention_mask": mask})
        except FeedError as error:
            raise ExportFolderError(f"{self.folder}: {error}") from None

    def _encode(self, texts: list[str], text_pairs: list[str] | None = None) -> dict[str, np.ndarray]:
        """Tokens (batch, seq), each row cut to the encoder's limit with a TruncationWarning where it was longer."""
        if text_pairs is not None and len(text_pairs) != len(texts):
            raise ValueError(f"{len(texts)} texts but {len(text_pairs)} text pairs; give one pair per text")
        limit = encoder_limit(self.positions, self.tokenizer)
        if limit is None:
            return dict(self.tokenizer(texts, text_pairs, padding=True, return_tensors="np"))
        self._warn_of_cuts(texts, text_pairs, limit)
        return dict(self.tokenizer(texts, text_pairs, padding=True, truncation=True, max_length=limit.tokens,
                                   return_tensors="np"))

    def _warn_of_cuts(self, texts: list[str], text_pairs: list[str] | None, limit: Limit) -> None:
        # verbose=False: transformers' own "longer than the specified maximum" log line would only repeat this one
        lengths = [len(ids) for ids in self.tokenizer(texts, text_pairs, verbose=False)["input_ids"]]
        for number, length in enumerate(lengths, start=1):
            if length > limit.tokens:
                warnings.warn(TruncationWarning(
                    f"text {number} is {length} tokens, over the model's limit of {limit.tokens} ({limit.source}): "
                    f"truncated to {limit.tokens}, {length - limit.tokens} tokens cut"
                ), stacklevel=4)

    def _require(self, task: str, method: str) -> None:
        if self.task != task:
            raise ExportFolderError(f"{method}() needs a {task} export; {self.folder} holds a {self.task} model")

    # -- tasks -----------------------------------------------------------------------------------------------------

    def classify(self, texts: list[str], text_pairs: list[str] | None = None) -> list[dict]:
        """[{"label": id2label[argmax], "probs": {label: probability}}] per text (softmax; sigmoid if multi-label)."""
        self._require(SEQ_CLS, "classify")
        logits = self.session.run(["logits"], self._feed(self._encode(texts, text_pairs)))[0]  # (batch, labels)
        multi_label = getattr(self.config, "problem_type", None) == "multi_label_classification"
        probs = 1 / (1 + np.exp(-logits)) if multi_label else _softmax(logits)
        labels = [self.config.id2label[i] for i in range(logits.shape[-1])]
        return [
            {"label": labels[int(row.argmax())], "probs": dict(zip(labels, map(float, row), strict=True))}
            for row in probs
        ]

    def embed(self, texts: list[str]) -> np.ndarray:
        """Mean of last_hidden_state over the non-padding tokens: (len(texts), hidden)."""
        self._require(FEATURES, "embed")
        if "last_hidden_state" not in [o.name for o in self.session.get_outputs()]:
            raise ExportFolderError(f"{self.folder}: embed() needs a last_hidden_state output")
        encoded = self._encode(texts)
        hidden = self.session.run(["last_hidden_state"], self._feed(encoded))[0]  # (batch, seq, hidden)
        mask = encoded.get("attention_mask", np.ones(hidden.shape[:2]))[..., None].astype(hidden.dtype)
        return (hidden * mask).sum(axis=1) / np.maximum(mask.sum(axis=1), 1.0)

    def generate_ids(self, input_ids: np.ndarray, max_new_tokens: int = 20) -> np.ndarray:
        """Greedy continuation of ``input_ids`` (batch, seq): the new tokens (batch, <= max_new_tokens).
        InputTooLongError when seq + max_new_tokens exceed the model's positions."""
        self._require(CAUSAL_LM, "generate")
        input_ids = np.asarray(input_ids, dtype=np.int64)
        check_room(self.positions, input_ids.shape[-1], max_new_tokens)
        return greedy(self.session, input_ids, max_new_tokens, sorted(self._eos_ids()), pad_id=self._pad_id())

    def prompt_ids(self, prompt: str, max_new_tokens: int = 20) -> np.ndarray:
        """The prompt's tokens (1, seq); InputTooLongError when they and max_new_tokens exceed the positions."""
        self._require(CAUSAL_LM, "generate")
        # verbose=False: a too-long prompt is refused below, not announced by transformers' log first
        input_ids = self.tokenizer(prompt, return_tensors="np", verbose=False)["input_ids"]
        check_room(self.positions, input_ids.shape[-1], max_new_tokens)
        return input_ids

    def generate(self, prompt: str, max_new_tokens: int = 20) -> str:
        """The greedy continuation of ``prompt`` (without the prompt)."""
        new = self.generate_ids(self.prompt_ids(prompt, max_new_tokens), max_new_tokens)[0]
        return self.tokenizer.decode(new, skip_special_tokens=True)

    def _eos_ids(self) -> set[int]:
        source = self.config
        if (self.folder / "generation_config.json").is_file():
            source = GenerationConfig.from_pretrained(self.folder)
        eos = getattr(source, "eos_token_id", None)
        return set() if eos is None else set(eos if isinstance(eos, list) else [eos])

    def _pad_id(self) -> int:
        pad = getattr(self.config, "pad_token_id", None)
        return pad if pad is not None else 0


# -- command line ----------------------------------------------------------------------------------------------------


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (argparse reports the error naming the flag and exits 2)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text}: must be an integer >= 1")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m export.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path, help="exported folder (model.onnx, config.json, tokenizer files)")
    parser.add_argument("--text", action="append", required=True,
                        help="input text; repeat for a batch. Encoders truncate a text longer than the model's "
                             "positions (with a warning); decoders refuse a prompt that leaves no room to generate")
    parser.add_argument("--text-pair", action="append", help="second segment per --text (classification)")
    parser.add_argument("--provider", default="cpu", help=f"one of {', '.join(PROVIDERS)} (default cpu)")
    parser.add_argument("--adapter", metavar="NAME",
                        help="an --adapters export: run with adapter NAME (its NAME.onnx_adapter) active; without it "
                             "the base model runs")
    parser.add_argument("--max-new-tokens", type=positive_int, default=20,
                        help="causal LM: tokens to generate (>= 1); prompt tokens + this must fit the model's "
                             "positions (default 20)")
    return parser


def _print_results(pipeline: OnnxPipeline, args: argparse.Namespace) -> None:
    if pipeline.task == SEQ_CLS:
        for text, result in zip(args.text, pipeline.classify(args.text, args.text_pair), strict=True):
            probs = ", ".join(f"{label}={p:.4f}" for label, p in result["probs"].items())
            print(f"{text!r}: {result['label']} ({probs})")
    elif pipeline.task == CAUSAL_LM:
        for text in args.text:  # refuse any prompt that does not fit before generating for the first
            pipeline.prompt_ids(text, args.max_new_tokens)
        for text in args.text:
            print(f"{text!r} -> {pipeline.generate(text, args.max_new_tokens)!r}")
    else:
        for text, vector in zip(args.text, pipeline.embed(args.text), strict=True):
            print(f"{text!r}: embedding dim {vector.shape[0]}, norm {np.linalg.norm(vector):.4f}, "
                  f"first {np.array2string(vector[:4], precision=4)}")


@contextmanager
def _truncation_warnings_as_lines() -> Iterator[None]:
    """Each TruncationWarning as one ``warning: ...`` line on stderr (every time, not once per place); other
    warnings as Python shows them."""
    with warnings.catch_warnings():
        warnings.simplefilter("always", TruncationWarning)
        show_others = warnings.showwarning

        def show(message, category, *args, **kwargs) -> None:
            if issubclass(category, TruncationWarning):
                print(f"warning: {message}", file=sys.stderr)
            else:
                show_others(message, category, *args, **kwargs)

        warnings.showwarning = show
        yield


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.text_pair is not None and len(args.text_pair) != len(args.text):
        parser.error(f"{len(args.text)} --text but {len(args.text_pair)} --text-pair; give one pair per text")
    empty = [i + 1 for i, text in enumerate(args.text) if not text.strip()]
    if empty:
        parser.error(f"--text number {', '.join(map(str, empty))} is empty; give the text to run")
    try:
        pipeline = OnnxPipeline.from_dir(args.folder, provider=args.provider, adapter=args.adapter)
        with _truncation_warnings_as_lines():
            _print_results(pipeline, args)
    except (FileNotFoundError, ProviderError, ExportFolderError, InputTooLongError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
