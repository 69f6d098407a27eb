"""Export a model artifact's CLIP embedding graph, and its head, to ONNX, inside the artifact.

    python -m models.export_onnx runs/demo/run/model                  # fp32
    python -m models.export_onnx runs/demo/run/model --quantize int8  # and embed.int8.onnx (docs/serving.md)

Writes ``MODEL_DIR/onnx/`` atomically:

- ``embed.onnx``: (B, 3, H, W) uint8 pixels, (B, T) input_ids and attention_mask -> (B, D)
  ``img`` and ``txt`` embeddings, L2-normalised; pixel normalisation is inside the graph.
  Batch and sequence axes are dynamic. ``load_model(dir, runtime="onnx")`` runs it.
- ``embed.int8.onnx`` (``--quantize int8``): the same graph with int8 weights, activations
  quantised per batch (dynamic quantisation). ``runtime="int8"`` runs it; nothing else does.
- ``head.onnx``: img, txt, (B,) sentiment, (B, F) features -> (B,) ``score`` on the model
  scale (the target's mean/std are folded in), so a deployment can predict without torch.
  The server keeps the head and the Shapley contributions in torch, on the embeddings.
- ``export.json``: opset, versions, input/output names, dynamic axes, the source artifact's
  version (a later retrain makes the export stale, and the loader refuses it), and the
  largest difference from eager torch measured on sample posts, per embedding graph.
"""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as `python models/export_onnx.py`: make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from common.config import atomic_dir, config_dict, field, git_commit, parse_config, setup_logging
from models.runtime import (EMBED_FILE, EMBED_INPUTS, EMBED_OUTPUTS, EXPORT_CONFIG, HEAD_FILE, INT8_FILE,
                            OnnxEmbedder, export_dir, sample_batch)

log = logging.getLogger(__name__)

HEAD_INPUTS = ("img", "txt", "sentiment", "features")
HEAD_OUTPUTS = ("score",)
EXPORT_BATCH = 2  # example batch size: 0 and 1 would be specialised into the graph as constants
EXPORT_SEQ = 7  # example caption length, likewise


@dataclass
class ExportConfig:
    """Export a model artifact's embedding graph and head to ONNX (MODEL_DIR/onnx/)."""

    model_dir: str = field(help="model artifact directory (RUN_DIR/model)", positional=True)
    quantize: str = field("none", choices=("none", "int8"),
                          help="int8: also write embed.int8.onnx, the embedding graph's dynamic int8 "
                               "quantisation (onnxruntime.quantization.quantize_dynamic) for runtime=int8; "
                               "smaller, less exact")
    opset: int = field(18, help="ONNX opset (18: the torch exporter's own)")
    check_posts: int = field(4, help="sample posts the export is compared with eager torch on")

    def __post_init__(self):
        if self.check_posts < 1:
            raise ValueError("--check-posts must be at least 1")


class EmbedGraph(torch.nn.Module):
    """``CLIPRegressor.embed`` with positional tensor inputs, the form the exporter traces."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, pixel_values, input_ids, attention_mask):
        return self.model.embed(pixel_values, input_ids, attention_mask)


class HeadGraph(torch.nn.Module):
    """Embeddings + sentiment + features -> (B,) score on the model scale."""

    def __init__(self, model, target):
        super().__init__()
        self.model = model
        self.mean, self.std = float(target.mean), float(target.std)

    def forward(self, img, txt, sentiment, features):
        return self.model.head_forward(img, txt, sentiment, features) * self.std + self.mean


def export_graph(module: torch.nn.Module, args: tuple, inputs: tuple[str, ...], outputs: tuple[str, ...],
                 axes: dict[str, dict[int, str]], dims: dict[str, "torch.export.Dim"], path: Path, opset: int) -> None:
    """torch.onnx.export with the torch.export-based exporter (dynamo=True; TorchScript's is deprecated).

    ``axes``: input -> {axis: axis name}; ``dims``: axis name -> its ``torch.export.Dim``,
    one object per name so that inputs sharing an axis (input_ids, attention_mask) share it.
    """
    shapes = {k: {axis: dims[name] for axis, name in axes[k].items()} if k in axes else None for k in inputs}
    program = torch.onnx.export(module.eval(), args, input_names=list(inputs), output_names=list(outputs),
                                dynamic_shapes=shapes, opset_version=opset, dynamo=True, external_data=False)
    program.save(str(path), external_data=False)  # one file: B/32 is ~600 MB, under protobuf's 2 GB


def embed_axes() -> dict[str, dict[int, str]]:
    return {"pixel_values": {0: "batch"}, "input_ids": {0: "batch", 1: "seq"},
            "attention_mask": {0: "batch", 1: "seq"}, "img": {0: "batch"}, "txt": {0: "batch"}}


def head_axes() -> dict[str, dict[int, str]]:
    return {name: {0: "batch"} for name in HEAD_INPUTS + HEAD_OUTPUTS}


def export_model(loaded, out: Path, opset: int) -> None:
    """Write ``out/embed.onnx`` and ``out/head.onnx`` for a ``LoadedModel`` (fp32)."""
    model = loaded.model.eval()
    b = sample_batch(loaded.batcher, EXPORT_BATCH)  # captions of different lengths: padded text
    # A caption is at most the text tower's positions long; without the bound torch.export
    # finds that constraint itself and refuses the unbounded axis.
    dims = {"batch": torch.export.Dim("batch"), "seq": torch.export.Dim("seq", max=loaded.batcher.max_length)}
    log.info("exporting the embedding graph (both CLIP towers); this takes a while")
    export_graph(EmbedGraph(model), tuple(b[k] for k in EMBED_INPUTS), EMBED_INPUTS, EMBED_OUTPUTS, embed_axes(),
                 dims, out / EMBED_FILE, opset)
    with torch.no_grad():
        img, txt = model.embed(b["pixel_values"], b["input_ids"], b["attention_mask"])
    export_graph(HeadGraph(model, loaded.target), (img, txt, b["sentiment"], b["features"]), HEAD_INPUTS,
                 HEAD_OUTPUTS, head_axes(), dims, out / HEAD_FILE, opset)


def quantize_int8(fp32: Path, out: Path) -> None:
    """Write the dynamic int8 quantisation of ``fp32`` to ``out``: int8 weights (per tensor),
    activations quantised per batch at run time, so no calibration data is needed. Per-channel
    weights and unsigned ones were measured too (docs/design-notes.md); none was both faster and closer."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(fp32, out, weight_type=QuantType.QInt8)


@torch.no_grad()
def check_export(loaded, out: Path, n: int, embed_file: str = EMBED_FILE) -> dict[str, float]:
    """Largest |ONNX - eager| on ``n`` sample posts: embeddings, the score through ``embed_file``
    and the torch head, and head.onnx's score on the eager embeddings (model scale)."""
    import onnxruntime as ort

    model = loaded.model.eval()
    b = sample_batch(loaded.batcher, n, seed=1)
    args = tuple(b[k] for k in EMBED_INPUTS)
    img, txt = model.embed(*args)
    o_img, o_txt = OnnxEmbedder(out / embed_file)(*args)

    def score(i, t):  # (B,) model scale, through the torch head
        return loaded.target.unstandardise(model.head_forward(i, t, b["sentiment"], b["features"]))

    head = ort.InferenceSession(str(out / HEAD_FILE), providers=["CPUExecutionProvider"])
    feeds = {"img": img.numpy(), "txt": txt.numpy(), "sentiment": b["sentiment"].numpy(),
             "features": b["features"].numpy()}
    head_score = torch.from_numpy(head.run(list(HEAD_OUTPUTS), feeds)[0])
    diff = lambda a, c: float((a.double() - c.double()).abs().max())  # noqa: E731
    return {"posts": n, "img": diff(img, o_img), "txt": diff(txt, o_txt),
            "score": diff(score(img, txt), score(o_img, o_txt)), "head_score": diff(score(img, txt), head_score)}


def export_record(loaded, cfg: ExportConfig, check: dict, int8_check: dict | None) -> dict:
    """export.json: what the files are, what made them, and how far they are from eager torch."""
    import onnx
    import onnxruntime
    import onnxscript
    import transformers

    from models.artifact import artifact_version

    json_axes = lambda axes, names: {k: {str(a): n for a, n in axes[k].items()} for k in names}  # noqa: E731
    return {
        "exporter": "torch.onnx.export(dynamo=True)",
        "opset": cfg.opset,
        "versions": {"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__,
                     "onnxscript": onnxscript.__version__, "transformers": transformers.__version__},
        "source_version": artifact_version(loaded.path),  # load_model refuses the export when this differs
        "quantize": None if cfg.quantize == "none" else cfg.quantize,  # int8: embed.int8.onnx written too
        "embed": {"file": EMBED_FILE, "inputs": list(EMBED_INPUTS), "outputs": list(EMBED_OUTPUTS),
                  "dynamic_axes": json_axes(embed_axes(), EMBED_INPUTS + EMBED_OUTPUTS),
                  "pixel_values": "uint8 0-255, resized and cropped by the saved processor; normalised in the graph",
                  "max_text_length": loaded.batcher.max_length},
        "head": {"file": HEAD_FILE, "inputs": list(HEAD_INPUTS), "outputs": list(HEAD_OUTPUTS),
                 "dynamic_axes": json_axes(head_axes(), HEAD_INPUTS + HEAD_OUTPUTS),
                 "score": "model scale (the target transform of the label, e.g. log1p(likes))"},
        "check_max_abs_diff": check,  # vs eager torch on sample posts; score on the model scale
        "int8": None if int8_check is None else {  # --quantize int8: embed.int8.onnx, for runtime=int8
            "file": INT8_FILE, "quantization": "quantize_dynamic, QInt8 weights per tensor",
            "check_max_abs_diff": int8_check},
        "git_commit": git_commit(),
    }


def main(argv: list[str] | None = None) -> Path:
    # 1. Parse args, configure logging.
    cfg = parse_config(ExportConfig, argv)
    setup_logging()
    for noisy in ("onnxscript", "onnx_ir"):  # a line per optimisation pass otherwise
        logging.getLogger(noisy).setLevel(logging.WARNING)
    log.info("config: %s", config_dict(cfg))
    from models.artifact import load_model

    # 2. The artifact as torch runs it: the graphs are traced from it and checked against it.
    loaded = load_model(cfg.model_dir)
    out = export_dir(cfg.model_dir)
    # 3. Export, quantise, check and describe in a temp dir; it replaces onnx/ only when all succeed.
    with atomic_dir(out) as tmp:
        export_model(loaded, tmp, cfg.opset)
        check, int8_check = check_export(loaded, tmp, cfg.check_posts), None
        if cfg.quantize == "int8":
            quantize_int8(tmp / EMBED_FILE, tmp / INT8_FILE)
            int8_check = check_export(loaded, tmp, cfg.check_posts, INT8_FILE)
        (tmp / EXPORT_CONFIG).write_text(json.dumps(export_record(loaded, cfg, check, int8_check), indent=2) + "\n")
    for name, c in (("fp32", check), ("int8", int8_check)):
        if c:
            log.info("wrote %s; max |%s onnx - torch| on %d sample posts: embeddings %.2g, score %.2g",
                     out, name, c["posts"], max(c["img"], c["txt"]), c["score"])
    return out


if __name__ == "__main__":
    main()
