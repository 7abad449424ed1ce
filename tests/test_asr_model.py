"""The sample ASR model: streaming chunk by chunk equals offline with the same
chunk mask (eager and through the engine), and the frontend streams exactly."""

from pathlib import Path

import numpy as np
import pytest
import torch
from torch.export import Dim

from apps.asr.model import AsrModel, ModelConfig, StreamingStep, chunk_mask, grow_depth
from dsstream.frontend import FbankConfig, LogMel, StreamingFbank
from dsstream.frontend_torch import Fbank

SMALL = ModelConfig(d_model=32, layers=2, heads=2, conv_kernel=5, sub_channels=8, chunk=4,
                    left=6, dropout=0.0)  # fmt: skip


def _stream(step: StreamingStep, feats: torch.Tensor) -> torch.Tensor:
    state = step.initial_state(feats.shape[0])
    state = tuple(s.to(feats.dtype) for s in state)
    size = 4 * step.model.cfg.chunk
    outs = []
    for start in range(0, feats.shape[1], size):
        logp, *state = step(feats[:, start : start + size], *state)
        outs.append(logp)
    return torch.cat(outs, dim=1)


@pytest.mark.parametrize("chunks", [1, 3, 7])
def test_streaming_equals_offline_with_the_chunk_mask(chunks):
    torch.manual_seed(chunks)
    model = AsrModel(SMALL).double().eval()
    feats = torch.randn(2, 4 * SMALL.chunk * chunks, 80, dtype=torch.float64)
    with torch.no_grad():
        offline = model(feats)
        streamed = _stream(StreamingStep(model), feats)
    assert offline.shape == (2, SMALL.chunk * chunks, SMALL.vocab)
    torch.testing.assert_close(streamed, offline, rtol=1e-10, atol=1e-10)


def _trained_like(model: AsrModel) -> AsrModel:
    """Non-default LayerNorm affines, as a trained model has (the growth moves them)."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.3, 0.3)
    return model


@pytest.mark.parametrize("layers", [2, 3, 5])
def test_grow_depth_keeps_the_function_and_streams_exactly(layers):
    torch.manual_seed(layers)
    model = _trained_like(AsrModel(SMALL).double().eval())
    feats = torch.randn(2, 4 * SMALL.chunk * 3, 80, dtype=torch.float64)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    grown = grow_depth(model, layers).double().eval()
    assert grown.cfg.layers == len(grown.blocks) == layers
    with torch.no_grad():
        want = model(feats)
        got = grown(feats)
        streamed = _stream(StreamingStep(grown), feats)
    # Equal to LayerNorm's epsilon (a normalized vector normalized again).
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4)
    torch.testing.assert_close(streamed, got, rtol=1e-10, atol=1e-10)
    for key, value in model.state_dict().items():  # the source model is untouched
        assert torch.equal(value, before[key]), key
    if layers > SMALL.layers:  # and the new blocks can learn: gradients reach them
        grown.train()
        grown(feats).sum().backward()
        new = grown.blocks[1]  # the first new block goes after old block 0
        assert new.att.out.weight.grad.abs().sum() > 0


def test_grow_depth_refuses_to_shrink():
    with pytest.raises(ValueError, match="adds layers"):
        grow_depth(AsrModel(SMALL), 1)


def test_padding_does_not_change_valid_frames():
    torch.manual_seed(0)
    model = AsrModel(SMALL).double().eval()
    feats = torch.randn(1, 48, 80, dtype=torch.float64)
    padded = torch.cat([feats, torch.randn(1, 16, 80, dtype=torch.float64)], 1)
    with torch.no_grad():
        alone = model(feats)
        batch = model(padded, lengths=torch.tensor([48]))[:, :12]
    torch.testing.assert_close(batch, alone, rtol=1e-10, atol=1e-10)


def test_chunk_mask_shape_and_content():
    blocked = chunk_mask(8, chunk=2, left=2)[0]
    # frame 5 is in chunk [4, 6): it sees frames 2..5
    assert blocked[5].tolist() == [True, True, False, False, False, False, True, True]


def test_streaming_model_runs_in_an_engine_session(tmp_path):
    from engine import InferenceEngine, StateSpec, convert

    torch.manual_seed(1)
    model = AsrModel(SMALL).eval()
    step = StreamingStep(model)
    example = (torch.randn(2, 4 * SMALL.chunk, 80), *step.initial_state(2))
    names = list(StreamingStep.STATE)
    path = convert(
        step, example, dynamic_shapes=tuple({0: Dim("batch", max=64)} for _ in example),
        input_names=["feats", *names], output_names=["logp", *[f"new_{n}" for n in names]],
        output=tmp_path / "asr.ds", state=[StateSpec(n, n, f"new_{n}") for n in names],
    )  # fmt: skip
    engine = InferenceEngine(path)
    session = engine.open_session()
    feats = torch.randn(1, 4 * SMALL.chunk * 5, 80)
    size = 4 * SMALL.chunk
    streamed = np.concatenate([
        session.step({"feats": feats[:, i : i + size].numpy()})["logp"]
        for i in range(0, feats.shape[1], size)
    ], axis=1)  # fmt: skip
    with torch.no_grad():
        offline = model.double()(feats.double()).numpy()
        eager = model.float()(feats).numpy()
    assert np.abs(streamed - offline).max() <= 4 * np.abs(eager - offline).max() + 1e-5


def test_frontend_streams_exactly():
    rng = np.random.default_rng(0)
    wave = (rng.standard_normal(16000) * 0.1).astype(np.float32)
    fbank = Fbank(FbankConfig())
    offline = fbank(torch.from_numpy(wave)[None])[0].numpy()
    assert offline.shape == (98, 80)  # (16000 - 400) // 160 + 1
    stream = StreamingFbank(fbank)
    cuts = np.sort(rng.choice(np.arange(1, 16000), 20, replace=False))
    frames = np.concatenate([stream.process(c) for c in np.split(wave, cuts)])
    # The stream computes with NumPy's mel matrix (float32 pow rounds apart
    # from torch's by up to 5e-6, which a log of a weak band magnifies).
    np.testing.assert_allclose(frames, offline, rtol=1e-5, atol=1e-4)
    norm = Fbank(FbankConfig(mean=tuple([1.0] * 80), std=tuple([2.0] * 80)))
    np.testing.assert_allclose(norm(torch.from_numpy(wave)[None])[0].numpy(),
                               (offline - 1.0) / 2.0, rtol=1e-5, atol=1e-5)  # fmt: skip


def test_frontend_numpy_path_equals_the_torch_module():
    rng = np.random.default_rng(1)
    wave = (rng.standard_normal(8000) * 0.3).astype(np.float32)
    cfg = FbankConfig(mean=tuple(rng.uniform(-8, 0, 80)), std=tuple(rng.uniform(1, 4, 80)))
    fbank = Fbank(cfg)
    with torch.no_grad():
        reference = fbank(torch.from_numpy(wave)[None])[0].numpy()
    ours = fbank.numpy(wave)
    assert ours.dtype == np.float32 and ours.shape == reference.shape == (48, 80)
    np.testing.assert_allclose(ours, reference, rtol=1e-5, atol=1e-4)
    assert np.array_equal(LogMel(cfg)(wave), ours)  # what a server runs, without torch
    assert fbank.numpy(wave[:399]).shape == (0, 80)  # shorter than one window
    assert fbank.numpy(wave[:400]).shape == (1, 80)


def test_frontend_matrices_are_torchaudios():
    import torchaudio

    from dsstream.frontend import hann_window, mel_matrix

    cfg = FbankConfig(n_mels=64, f_min=40.0, f_max=7000.0)
    mel = torchaudio.transforms.MelSpectrogram(
        sample_rate=16000, n_fft=400, win_length=400, hop_length=160, f_min=40.0, f_max=7000.0,
        n_mels=64, center=False, power=2.0,
    )  # fmt: skip
    np.testing.assert_allclose(mel_matrix(cfg), mel.mel_scale.fb.numpy(), rtol=0, atol=1e-5)
    np.testing.assert_allclose(hann_window(400), torch.hann_window(400).numpy(), atol=3e-7)


def test_export_writes_a_self_describing_streaming_artifact(tmp_path):
    from apps.asr.export import export_streaming
    from engine import InferenceEngine, read_manifest

    torch.manual_seed(2)
    model = AsrModel(SMALL)
    fb = FbankConfig(mean=tuple([0.5] * 80), std=tuple([2.0] * 80))
    path = export_streaming(model, fb, tmp_path / "asr.ds")
    manifest, _ = read_manifest(path)
    extra = manifest.extra
    assert extra["vocabulary"][:3] == ["<blank>", "|", "'"] and extra["blank_id"] == 0
    assert extra["frontend"]["mean"][0] == 0.5 and extra["chunk_feature_frames"] == 16
    assert {s["name"] for s in extra["state"]} == set(StreamingStep.STATE)
    session = InferenceEngine(path).open_session()
    out = session.step({"feats": np.zeros((1, 16, 80), np.float32)})
    assert out["logp"].shape == (1, SMALL.chunk, SMALL.vocab)


def test_bring_your_own_model_wav2vec2(tmp_path):
    """torchaudio's wav2vec2 architecture (random weights: nothing is downloaded)."""
    import torchaudio

    from apps.asr.export import export_ctc
    from dsstream.decoding import ENGLISH_CHARS
    from engine import InferenceEngine, read_manifest

    torch.manual_seed(4)
    model = torchaudio.models.wav2vec2_model(
        extractor_mode="group_norm", extractor_conv_layer_config=None, extractor_conv_bias=False,
        encoder_embed_dim=32, encoder_projection_dropout=0.0, encoder_pos_conv_kernel=16,
        encoder_pos_conv_groups=4, encoder_num_layers=1, encoder_num_heads=2,
        encoder_attention_dropout=0.0, encoder_ff_interm_features=64, encoder_ff_interm_dropout=0.0,
        encoder_dropout=0.0, encoder_layer_norm_first=False, encoder_layer_drop=0.0,
        aux_num_out=len(ENGLISH_CHARS),
    )  # fmt: skip
    path = export_ctc(model, list(ENGLISH_CHARS.tokens), tmp_path / "w2v.ds", max_seconds=5)
    manifest, _ = read_manifest(path)
    assert manifest.extra["input"] == "waveform" and manifest.extra["streaming"] is False
    wave = torch.randn(1, 24000)
    logp = InferenceEngine(path).infer({"waveform": wave.numpy()})["logp"]
    with torch.no_grad():
        ref = model.eval()(wave)[0].log_softmax(-1).numpy()
    assert logp.shape == ref.shape == (1, 74, len(ENGLISH_CHARS))
    assert np.abs(logp - ref).max() < 1e-3
    with pytest.raises(ValueError, match="frontend"):
        export_ctc(model, list(ENGLISH_CHARS.tokens), tmp_path / "x.ds", input_kind="features")


def test_a_checkpoint_is_recovered_from_the_streaming_artifact(tmp_path):
    """The engine folds each LayerNorm's affine into the next Linear; the recovered
    model is the same function, with the run state the export kept."""
    from apps.asr.export import main as export_main
    from apps.asr.recover import checkpoint_from_artifact
    from apps.asr.recover import main as recover_main
    from engine.artifact import ArtifactError

    torch.manual_seed(5)
    model = AsrModel(SMALL)
    with torch.no_grad():  # non-trivial norms, so that folding them changes the weights
        for module in model.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.3, 0.3)
    fb = FbankConfig(mean=tuple([0.5] * 80), std=tuple([2.0] * 80))
    state = {"epoch": 3, "step": 40, "history": [{"epoch": 2, "step": 40, "loss": 1.0}],
             "changes": [{"step": 0, "eq": 0.5}], "anneal": {"from_step": 20, "steps": 20,
             "to_epoch": 3}}  # fmt: skip
    ckpt = tmp_path / "run.pt"
    torch.save({"model": model.state_dict(), "config": SMALL.to_dict(),
                "fbank": fb.to_dict(), "state": state}, ckpt)  # fmt: skip
    artifact = export_main(["--checkpoint", str(ckpt), "--out", str(tmp_path / "asr.ds")])

    recovered = checkpoint_from_artifact(artifact)
    assert recovered["state"] == {
        **state,
        "changes": [*state["changes"], {"step": 40, "recovered": "asr.ds"}],
    }
    assert recovered["config"] == SMALL.to_dict()
    assert recovered["fbank"] == {k: list(v) if isinstance(v, tuple) else v  # as JSON keeps it
                                  for k, v in fb.to_dict().items()}  # fmt: skip
    assert "optimizer" not in recovered
    again = AsrModel(SMALL)
    again.load_state_dict(recovered["model"])
    assert torch.equal(again.blocks[0].att.norm.weight, torch.ones(SMALL.d_model))
    assert not torch.equal(again.blocks[0].att.norm.weight, model.blocks[0].att.norm.weight)
    feats = torch.randn(2, 4 * SMALL.chunk * 3, 80)
    with torch.no_grad():
        torch.testing.assert_close(again.eval()(feats), model.eval()(feats), rtol=0, atol=1e-4)

    out = tmp_path / "ckpt" / "last.pt"
    assert recover_main([str(artifact), "--out", str(out)]) == out
    assert torch.load(out, weights_only=False)["state"]["step"] == 40
    with pytest.raises(SystemExit):  # never overwrites a run's checkpoint unasked
        recover_main([str(artifact), "--out", str(out)])
    assert recover_main([str(artifact), "--out", str(out), "--force"]) == out
    with pytest.raises(ArtifactError, match="quantized"):
        checkpoint_from_artifact(Path(__file__).parents[1] / "samples/asr/model-int8.ds")
    from apps.asr.export import export_ctc
    from dsstream.decoding import ENGLISH_CHARS

    class Frames(torch.nn.Module):
        def forward(self, x):
            return torch.zeros(x.shape[0], x.shape[1], len(ENGLISH_CHARS)) + x[..., :1]

    other = export_ctc(Frames(), list(ENGLISH_CHARS.tokens), tmp_path / "ctc.ds",
                       input_kind="features", frontend=fb, max_seconds=2)  # fmt: skip
    with pytest.raises(ArtifactError, match="not a streaming ASR artifact"):
        checkpoint_from_artifact(other)


def test_export_sets_the_chunk_and_left_context(tmp_path):
    """--chunk/--left at export: the artifact streams exactly what the offline model
    computes under that chunk mask, and its state holds that many frames."""
    from dataclasses import replace

    from apps.asr.export import main as export_main
    from engine import InferenceEngine, read_manifest

    torch.manual_seed(6)
    model = AsrModel(SMALL).eval()
    fb = FbankConfig(mean=tuple([0.0] * 80), std=tuple([1.0] * 80))
    ckpt = tmp_path / "run.pt"
    torch.save({"model": model.state_dict(), "config": SMALL.to_dict(), "fbank": fb.to_dict(),
                "state": {"epoch": 1, "step": 1, "history": []}}, ckpt)  # fmt: skip
    out = tmp_path / "wide.ds"
    export_main(["--checkpoint", str(ckpt), "--out", str(out), "--chunk", "8", "--left", "16"])
    extra = read_manifest(out)[0].extra
    assert extra["chunk_feature_frames"] == 32 and extra["model"]["left"] == 16
    session = InferenceEngine(out).open_session()
    feats = torch.randn(1, 32 * 3, 80)
    steps = [session.step({"feats": feats[:, i : i + 32].numpy()})["logp"] for i in (0, 32, 64)]
    model.cfg = replace(SMALL, chunk=8, left=16)
    with torch.no_grad():
        offline = model(feats).numpy()
    np.testing.assert_allclose(np.concatenate(steps, axis=1), offline, atol=1e-4)
    model.cfg = SMALL  # the trained geometry computes something else
    with torch.no_grad():
        assert np.abs(model(feats).numpy() - offline).max() > 1e-3
    with pytest.raises(SystemExit):
        export_main(["--checkpoint", str(ckpt), "--out", str(out), "--left", "0"])
