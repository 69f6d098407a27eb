"""The faster runtimes: ``python -m models.export_onnx``, bf16 autocast, and ``load_model(runtime=...)``.

One export of the tiny featured artifact (a copy, so the shared fixture stays torch-only)
serves every test here. fp32 ONNX agrees with eager torch to ~3e-7 on these models; the
bounds below leave a margin of ~30x and stay far under the 1e-3 a user would notice. bf16
rounds every matmul input to 8 significant bits: on this artifact scores move by up to 4.9e-3
on the model scale (score std 0.17), so its bound is 2e-2 (docs/serving.md, "CPU runtimes").
int8 rounds weights and activations to 256 levels per tensor: it moves scores several times
more, so its bound, INT8, is about 5x the largest difference measured.
"""

from __future__ import annotations

import json
import shutil

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from data_preprocessing.posts import Post
from models import export_onnx, runtime
from models.artifact import CONFIG_FILE, artifact_version, load_model, read_config
from tests.serving_fixtures import jpeg_bytes, serving_client
from tests.test_serving_uvicorn import running_server

TIGHT = 1e-5  # fp32 ONNX vs eager torch, model scale (measured ~3e-7)
BF16 = 2e-2  # bf16 autocast vs eager torch, model scale (measured 4.9e-3)
# int8 ONNX vs eager torch, model scale. Measured on 2 AVX2 cores: scores 9.9e-3, contributions
# 1.8e-2, the export's own check 1.6e-2.
INT8 = 0.1


@pytest.fixture(scope="module")
def exported(featured_model_dir, tmp_path_factory):
    """A copy of the featured artifact with its ONNX export, fp32 and int8, made by the command users run."""
    model_dir = tmp_path_factory.mktemp("onnx") / "model"
    shutil.copytree(featured_model_dir, model_dir)
    export_onnx.main([str(model_dir), "--quantize", "int8"])
    return model_dir


@pytest.fixture(scope="module")
def models(exported):
    return load_model(exported), load_model(exported, runtime="onnx")


@pytest.fixture(scope="module")
def batch(models):
    """Five posts with different images, captions (padded text) and feature values."""
    rng = np.random.default_rng(7)
    captions = ["sunset at the beach", "", "new shoes!!! #style #fashion #love", "coffee", "a dog in the park"]
    posts = [Post(Image.fromarray(rng.integers(0, 256, (200 + 10 * i, 260, 3), dtype=np.uint8)), c, 0.2 * i - 0.4,
                  {"followers": [10.0, None, 5e4, 1e3, 0.0][i], "platform": ["x", "tiktok", None, "x", "other"][i]})
             for i, c in enumerate(captions)]
    return models[0].batcher(posts)


def test_export_writes_its_config(exported):
    cfg = json.loads((exported / "onnx" / "export.json").read_text())
    assert cfg["source_version"] == artifact_version(exported)
    assert cfg["opset"] == 18 and cfg["quantize"] == "int8"
    assert cfg["embed"]["dynamic_axes"]["input_ids"] == {"0": "batch", "1": "seq"}
    assert cfg["versions"]["torch"] == torch.__version__
    assert max(v for k, v in cfg["check_max_abs_diff"].items() if k != "posts") < TIGHT
    int8 = cfg["int8"]["check_max_abs_diff"]
    assert cfg["int8"]["file"] == runtime.INT8_FILE and (exported / "onnx" / runtime.INT8_FILE).is_file()
    assert TIGHT < int8["score"] < INT8 and int8["head_score"] < TIGHT  # the head stays fp32


def test_onnx_predictions_match_torch(models, batch):
    """runtime=onnx runs the fp32 graph even when the export also holds the int8 one."""
    eager, onnx = models
    assert (onnx.runtime.name, onnx.runtime.requested) == ("onnx", "onnx")
    assert isinstance(onnx.embedder, runtime.OnnxEmbedder)
    a, b = eager.explain_batch(batch), onnx.explain_batch(batch)
    assert a.score.std() > 0.01  # the posts differ: equal scores below are not constants
    assert torch.allclose(a.score, b.score, atol=TIGHT, rtol=0)
    assert torch.allclose(a.contributions, b.contributions, atol=TIGHT, rtol=0)
    assert a.groups == b.groups == ["image", "caption", "sentiment", "followers", "platform"]
    for level, (low, high) in a.intervals.items():
        assert torch.allclose(low, b.intervals[level][0], rtol=1e-5)
    assert torch.allclose(eager.predict_batch(batch)[0], onnx.predict_batch(batch)[0], atol=TIGHT, rtol=0)


def test_a_batch_puts_the_model_in_eval_mode_only_when_it_left_it(models, batch, monkeypatch):
    """eval() walks every module (a fixed cost on each served batch), so a batch calls it only
    when the model is in training mode, and then predicts as in eval mode."""
    eager = models[0]
    expected = eager.explain_batch(batch).score
    calls, real = [], type(eager.model).train
    monkeypatch.setattr(type(eager.model), "train", lambda self, mode=True: calls.append(mode) or real(self, mode))
    eager.explain_batch(batch), eager.predict_batch(batch)
    assert calls == []
    eager.model.train()
    assert torch.equal(eager.explain_batch(batch).score, expected)
    assert calls == [True, False] and not eager.model.training


def test_onnx_runtime_does_not_call_the_torch_towers(models, batch, monkeypatch):
    eager, onnx = models
    expected = onnx.explain_batch(batch).score

    def refuse(*args, **kwargs):
        raise AssertionError("a torch CLIP tower ran")

    for loaded in models:  # each LoadedModel has its own CLIPModel: patch both
        monkeypatch.setattr(loaded.model.clip, "get_image_features", refuse)
        monkeypatch.setattr(loaded.model.clip, "get_text_features", refuse)
    with pytest.raises(AssertionError, match="tower ran"):  # the patch bites where torch embeds
        eager.explain_batch(batch)
    assert torch.equal(onnx.explain_batch(batch).score, expected)
    assert torch.equal(onnx.predict_batch(batch)[0], expected)


def test_head_onnx_needs_no_torch(exported, models, batch):
    """embed.onnx then head.onnx, as a torch-free deployment would run them: the same score."""
    import onnxruntime as ort

    sessions = {n: ort.InferenceSession(str(exported / "onnx" / f), providers=["CPUExecutionProvider"])
                for n, f in (("embed", runtime.EMBED_FILE), ("head", runtime.HEAD_FILE))}
    img, txt = sessions["embed"].run(None, {k: batch[k].numpy() for k in runtime.EMBED_INPUTS})
    (score,) = sessions["head"].run(None, {"img": img, "txt": txt, "sentiment": batch["sentiment"].numpy(),
                                           "features": batch["features"].numpy()})
    np.testing.assert_allclose(score, models[0].explain_batch(batch).score.numpy(), atol=TIGHT, rtol=0)


def test_onnx_without_export_says_what_to_run(model_dir):
    with pytest.raises(FileNotFoundError, match=r"no ONNX export .*; run: python -m models.export_onnx ") as e:
        load_model(model_dir, runtime="onnx")
    assert "\n" not in str(e.value)
    auto = load_model(model_dir, runtime="auto")
    assert "onnx" not in auto.runtime.name and "onnx" not in auto.runtime.ms_per_post
    assert "no ONNX export" in auto.runtime.reason and auto.embedder.name == auto.runtime.name


def test_a_stale_export_is_refused(exported, tmp_path):
    """Re-training rewrites config.json and the head; an export of the old weights must not serve."""
    stale = tmp_path / "model"
    shutil.copytree(exported, stale)
    cfg = read_config(stale)
    (stale / CONFIG_FILE).write_text(json.dumps({**cfg, "git_commit": "retrained"}))
    with pytest.raises(FileNotFoundError, match="re-run: python -m models.export_onnx"):
        load_model(stale, runtime="onnx")
    assert "onnx" not in load_model(stale, runtime="auto").runtime.name


def test_an_export_whose_embed_onnx_is_int8_is_refused(exported, tmp_path):
    """Before embed.int8.onnx, --quantize int8 overwrote embed.onnx: runtime=onnx must not run that as fp32."""
    old = tmp_path / "model"
    shutil.copytree(exported, old)
    cfg = json.loads((old / "onnx" / "export.json").read_text())
    (old / "onnx" / "export.json").write_text(json.dumps({k: v for k, v in cfg.items() if k != "int8"}))
    with pytest.raises(FileNotFoundError, match=r"has an int8 embed\.onnx .*; re-run: python -m models\.export_onnx"):
        load_model(old, runtime="onnx")
    assert "onnx" not in load_model(old, runtime="auto").runtime.name


def test_onnx_threads_stop_spinning_when_a_run_returns(models):
    """By default ORT's pool spins on after a run, on the cores that the torch head, the event
    loop and the next post's decoding need next."""
    opts = models[1].embedder.session.get_session_options()
    assert opts.get_session_config_entry("session.force_spinning_stop") == "1"
    assert (opts.intra_op_num_threads, opts.inter_op_num_threads) == (torch.get_num_threads(), 1)


def test_bf16_predictions_match_torch_within_its_bound(models, batch):
    eager = models[0]
    bf16 = load_model(eager.path, runtime="bf16")
    assert (bf16.runtime.name, bf16.embedder.name) == ("bf16", "bf16")
    a, b = eager.explain_batch(batch), bf16.explain_batch(batch)
    assert a.score.std() > 0.01
    assert not torch.equal(a.score, b.score)  # bf16 really ran: fp32 would agree exactly
    assert torch.allclose(a.score, b.score, atol=BF16, rtol=0)
    assert torch.allclose(a.contributions, b.contributions, atol=BF16, rtol=0)


def test_int8_predictions_match_torch_within_its_bound(models, batch):
    eager = models[0]
    int8 = load_model(eager.path, runtime="int8")
    assert (int8.runtime.name, int8.runtime.requested, int8.embedder.name) == ("int8", "int8", "int8")
    assert int8.embedder.path.name == runtime.INT8_FILE and int8.runtime.export["int8"]["file"] == runtime.INT8_FILE
    a, b = eager.explain_batch(batch), int8.explain_batch(batch)
    assert a.score.std() > 0.01
    assert not torch.allclose(a.score, b.score, atol=TIGHT, rtol=0)  # int8 really ran: fp32 ONNX would agree
    assert torch.allclose(a.score, b.score, atol=INT8, rtol=0)
    assert torch.allclose(a.contributions, b.contributions, atol=INT8, rtol=0)


def test_int8_without_its_export_says_what_to_run(exported, tmp_path):
    fp32_only = tmp_path / "model"
    shutil.copytree(exported, fp32_only)
    (fp32_only / "onnx" / runtime.INT8_FILE).unlink()
    with pytest.raises(FileNotFoundError, match=r"no ONNX export \(onnx/embed\.int8\.onnx\); run: "
                                                r"python -m models\.export_onnx .* --quantize int8$"):
        load_model(fp32_only, runtime="int8")
    assert load_model(fp32_only, runtime="onnx").runtime.name == "onnx"


def test_auto_times_every_candidate_and_routes_each_batch_size_to_its_fastest(exported, batch):
    auto = load_model(exported, runtime="auto")
    info = auto.runtime
    assert info.requested == "auto"
    # The export holds embed.int8.onnx too: auto leaves it to users who ask for it.
    assert set(info.ms_per_post) == {"torch", "onnx"} | ({"bf16"} if runtime.native_bf16() else set())
    assert all(set(ms) == {"1", "16"} and min(ms.values()) > 0 for ms in info.ms_per_post.values())
    for n, name in info.by_batch_size.items():
        assert name == min(info.ms_per_post, key=lambda r: info.ms_per_post[r][n])
        routed = auto.embedder.route(int(n)) if isinstance(auto.embedder, runtime.ByBatchSize) else auto.embedder
        assert routed.name == name
    assert info.name == auto.embedder.name == "+".join(dict.fromkeys(info.by_batch_size.values()))
    assert f"{info.by_batch_size['16']} at batch 16" in info.reason


class Named:
    """An embedder that only has a name: what routing and picking look at."""

    def __init__(self, name):
        self.name = name

    def __call__(self, pixel_values, input_ids, attention_mask):
        return self.name, len(pixel_values)


def test_router_sends_small_batches_to_the_batch_1_pick():
    router = runtime.ByBatchSize({16: Named("bf16"), 1: Named("onnx")})
    assert router.name == "onnx+bf16"
    assert [router.route(n).name for n in (1, 2, 4, 5, 16, 64)] == ["onnx"] * 3 + ["bf16"] * 3
    assert router(torch.zeros(7, 3, 2, 2), None, None) == ("bf16", 7)


@pytest.mark.parametrize("ms, name, export", [
    ({"torch": (5, 5), "onnx": (1, 4), "bf16": (9, 2)}, "onnx+bf16", {"x": 1}),
    ({"torch": (5, 5), "onnx": (6, 6), "bf16": (9, 9)}, "torch", None),
    ({"torch": (5, 5), "onnx": (6, 6), "bf16": (4, 1)}, "bf16", None)])
def test_auto_picks_by_the_timing(models, monkeypatch, ms, name, export):
    monkeypatch.setattr(runtime, "ms_per_post", lambda e, batches: dict(zip(("1", "16"), map(float, ms[e.name]))))
    chosen, info = runtime.fastest([Named(n) for n in ms], models[0].batcher, {"x": 1}, ["a note"])
    assert chosen.name == info.name == name and info.export == export
    assert isinstance(chosen, runtime.ByBatchSize) == ("+" in name)
    assert info.ms_per_post["bf16"]["16"] == ms["bf16"][1] and info.reason.endswith("; a note")


@pytest.mark.parametrize("amx, avx512_bf16, isa", [(True, True, "AMX"), (False, True, "AVX512_BF16"),
                                                    (False, False, "")])
def test_native_bf16_names_the_cpu_feature(monkeypatch, amx, avx512_bf16, isa):
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    assert runtime.native_bf16() == isa


def test_auto_leaves_bf16_out_without_native_bf16(exported, monkeypatch):
    monkeypatch.setattr(runtime, "native_bf16", lambda: "")
    info = load_model(exported, runtime="auto").runtime
    assert set(info.ms_per_post) == {"torch", "onnx"}
    assert "bf16 left out: this CPU has neither AMX nor AVX512_BF16" in info.reason
    assert "bf16 is emulated" in load_model(exported, runtime="bf16").runtime.reason


POST = {"data": {"text": "Sunset at the beach! #travel", "followers": "1200", "platform": "x"},
        "files": {"image": ("photo.jpg", jpeg_bytes(seed=5), "image/jpeg")}}


def torch_answer(model_dir) -> dict:
    with serving_client(model_dir) as client:
        assert client.get("/metadata").json()["model"]["runtime"]["name"] == "torch"
        return client.post("/predict", **POST).json()


def served(model_dir, tmp_path_factory, runtime_name) -> tuple[dict, dict]:
    """(/predict answer to POST, /metadata) from a uvicorn server started with RUNTIME=runtime_name."""
    with running_server(model_dir, tmp_path_factory, RUNTIME=runtime_name) as (base, _, _):
        return httpx.post(f"{base}/predict", **POST, timeout=30).json(), httpx.get(f"{base}/metadata", timeout=10).json()


def test_server_with_runtime_onnx_answers_as_torch_does(exported, tmp_path_factory):
    expected = torch_answer(exported)
    got, meta = served(exported, tmp_path_factory, "onnx")
    assert got["score"] == pytest.approx(expected["score"], abs=1e-3)
    assert got["score"] == pytest.approx(expected["score"], abs=TIGHT)
    for group, value in expected["contributions"].items():
        assert got["contributions"][group] == pytest.approx(value, abs=TIGHT)
    assert meta["model"]["runtime"]["name"] == "onnx" and meta["settings"]["runtime"] == "onnx"
    assert meta["model"]["runtime"]["export"]["source_version"] == got["model"]["version"]


def test_server_with_runtime_int8_says_so_and_stays_within_its_bound(exported, tmp_path_factory):
    expected = torch_answer(exported)
    got, meta = served(exported, tmp_path_factory, "int8")
    assert meta["model"]["runtime"]["name"] == "int8" and meta["settings"]["runtime"] == "int8"
    assert got["score"] != pytest.approx(expected["score"], abs=TIGHT)  # the int8 graph ran
    assert got["score"] == pytest.approx(expected["score"], abs=INT8)


def test_table_scorer_with_runtime_onnx_writes_torch_s_predictions(exported, tmp_path, monkeypatch):
    """serving/predict.py --runtime onnx: the same rows and scores as the default torch runtime."""
    from serving import predict
    from tests.test_predict import ROWS, _read, write_rows

    calls, onnx_call = [], runtime.OnnxEmbedder.__call__
    monkeypatch.setattr(runtime.OnnxEmbedder, "__call__", lambda self, *a: calls.append(1) or onnx_call(self, *a))
    posts = write_rows(tmp_path)
    out = {}
    for rt in ("torch", "onnx"):
        out[rt] = tmp_path / f"{rt}.csv"
        assert predict.main(["--model", str(exported), "--input", str(posts), "--out", str(out[rt]),
                             "--runtime", rt, "--num-workers", "0", "--max-reject-frac", "0.5", "--no-progress"]) == 0
    assert calls  # the onnx run really ran the ONNX session
    a, b = _read(out["torch"]), _read(out["onnx"])
    assert [r["row"] for r in a] == [r["row"] for r in b] and len(a) == len(ROWS) - 3
    for ra, rb in zip(a, b):
        assert float(rb["pred_score"]) == pytest.approx(float(ra["pred_score"]), abs=TIGHT)
