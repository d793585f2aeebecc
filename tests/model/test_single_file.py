"""Transformers from community single files (``pretrained_transformer_model_name_or_path``): GGUF files written by the
gguf package from the tiny transformer (Q8_0, Q4_0, K-quants), ComfyUI safetensors (bf16, fp8, fp8_scaled); what
they compute against the model folder's weights, what autograd saves, and the errors a bad file gets."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from shared.errors import InvalidInput
from shared.model.loading import load_transformer, transformer_config
from shared.model.quantize import quantized_modules
from shared.model.single_file import inspect_transformer_file
from shared.model.tiny_files import write_comfy_safetensors, write_gguf

# ‖y − y_model‖ / ‖y_model‖ of the tiny transformer's velocity from the file, against the folder's fp32 weights;
# each bound ~1.5x what the type gives on this model (measured: Q8_0 0.0056, Q4_0 0.093, bf16 0.0022,
# fp8 0.033, fp8_scaled 0.040)
TOLERANCE = {"Q8_0": 0.01, "Q4_0": 0.15, "bf16": 0.005, "fp8": 0.05, "fp8_scaled": 0.06}


def file_quantized_layers(model: torch.nn.Module) -> dict[str, str]:
    """Module → the file type its weight is kept in (``quantized_modules``' ``file:`` entries)."""
    return {n: k.removeprefix("file:") for n, k in quantized_modules(model).items() if k.startswith("file:")}


def weights(model_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(model_dir / "transformer" / "diffusion_pytorch_model.safetensors"))


def write(kind: str, model_dir: Path, path: Path, **kw: Any) -> Path:
    sd = weights(model_dir)
    if kind in ("Q8_0", "Q4_0"):
        write_gguf(sd, path, kind, **kw)
    else:
        write_comfy_safetensors(sd, path, kind)
    return path


def inputs(model: Any, seed: int = 0) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    c = model.config
    return dict(
        hidden_states=torch.randn(1, 16, c.in_channels, generator=g),
        encoder_hidden_states=torch.randn(1, 8, c.joint_attention_dim, generator=g),
        encoder_hidden_states_mask=torch.ones(1, 8),
        timestep=torch.tensor([0.5]),
        img_shapes=[[(1, 4, 4)]],
        return_dict=False,
    )


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.fixture(scope="module")
def v2(tiny_models: Any) -> Path:
    return Path(tiny_models("edit-v2"))


@pytest.fixture(scope="module")
def reference(v2: Path) -> torch.Tensor:
    m = load_transformer(v2, "edit-v2").eval()
    with torch.no_grad():
        return m(**inputs(m))[0]


@pytest.mark.parametrize("kind", ["Q8_0", "Q4_0", "bf16", "fp8", "fp8_scaled"])
def test_each_file_kind_computes_the_folders_transformer_within_its_tolerance(
    kind: str, v2: Path, reference: torch.Tensor, tmp_path: Path
) -> None:
    path = write(kind, v2, tmp_path / ("t.gguf" if kind.startswith("Q") else "t.safetensors"))
    m = load_transformer(v2, "edit-v2", transformer=str(path)).eval()
    layers = file_quantized_layers(m)
    linears = [n for n, x in m.named_modules() if isinstance(x, torch.nn.Linear)]
    expected = {"Q8_0": "Q8_0", "Q4_0": "Q4_0", "fp8": "float8_e4m3fn", "fp8_scaled": "float8_e4m3fn"}.get(kind)
    if expected is None:  # bf16: plain Linears in the compute dtype, for base_model_precision to quantize
        assert layers == {} and all(p.dtype == torch.float32 for p in m.parameters())
    else:  # every Linear above convert.py's 1024-element threshold keeps the file's type (the tiny model: all 34)
        assert set(layers.values()) == {expected} and len(layers) == len(linears) == 34
        assert all(
            p.dtype == torch.uint8
            for n, p in m.named_parameters()
            if n.rsplit(".", 1)[0] in layers and n.endswith("weight")
        )
    with torch.no_grad():
        y = m(**inputs(m))[0]
    err = rel_err(y, reference)
    assert err < TOLERANCE[kind], (kind, err)
    # fp8_scaled with its scales ignored (what diffusers' from_single_file does) is far off: the scales are applied
    if kind == "fp8_scaled":
        assert err < 0.5 * rel_err(torch.zeros_like(y), reference)


def test_kquant_layers_dequantize_as_gguf_does_and_train(v2: Path, tmp_path: Path) -> None:
    sd = weights(v2)
    kq = {
        "transformer_blocks.0.img_mlp.net.2.weight": "Q4_K",
        "transformer_blocks.0.txt_mlp.net.2.weight": "Q6_K",
        "transformer_blocks.1.img_mlp.net.2.weight": "Q5_K",
        "transformer_blocks.1.txt_mlp.net.2.weight": "Q3_K",
    }
    path = tmp_path / "kq.gguf"
    write_gguf(sd, path, "Q8_0", overrides=kq)
    tf = inspect_transformer_file(path, "edit-v2", transformer_config(v2, "edit-v2"))
    assert {k: tf.kinds()[k][0] for k in ("Q4_K", "Q6_K", "Q5_K", "Q3_K", "Q8_0")} == {
        "Q4_K": 1,
        "Q6_K": 1,
        "Q5_K": 1,
        "Q3_K": 1,
        "Q8_0": 30,
    }
    m = load_transformer(v2, "edit-v2", transformer=str(path))
    reader = gguf.GGUFReader(str(path))
    for t in reader.tensors:
        if t.name in kq:
            layer = m.get_submodule(t.name.rsplit(".", 1)[0])
            want = gguf.quants.dequantize(t.data, t.tensor_type)
            got = layer.weight_of(torch.float32).numpy()
            assert got.shape == (64, 256) and np.abs(want).max() > 0.1
            np.testing.assert_allclose(got, want, rtol=2e-3, atol=2e-3 * np.abs(want).max())  # fp16 block math
    from shared.model.lora import attach_lora

    attach_lora(m, 4, 4.0, 0.0, ["to_q", "to_k", "to_v", "to_out.0", "img_mlp.net.2", "txt_mlp.net.2"], seed=0)
    m.train()
    m(**inputs(m))[0].pow(2).mean().backward()
    grads = {n for n, p in m.named_parameters() if p.grad is not None}
    assert grads and all("lora_" in n for n in grads)
    assert "transformer_blocks.0.img_mlp.net.2.lora_A.default.weight" in grads


class SavedBytes:
    """Bytes of every tensor autograd saves (parameters excluded), and of those shaped like a Linear weight."""

    def __init__(self, model: torch.nn.Module):
        self.params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self.shapes = {(x.out_features, x.in_features) for x in model.modules() if isinstance(x, torch.nn.Linear)}
        self.total = self.weights = 0

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        if t.untyped_storage().data_ptr() not in self.params:
            n = t.numel() * t.element_size()
            self.total += n
            if tuple(t.shape) in self.shapes or tuple(t.shape[::-1]) in self.shapes:
                self.weights += n
        return t


def saved_and_grads(model: torch.nn.Module) -> tuple[SavedBytes, dict[str, torch.Tensor]]:
    meter = SavedBytes(model)
    with torch.autograd.graph.saved_tensors_hooks(meter.pack, lambda t: t):
        y = model(**inputs(model))[0]
    y.pow(2).mean().backward()
    return meter, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_no_dequantized_weight_is_saved_for_backward_and_the_gradients_are_the_stock_layers(
    v2: Path, tmp_path: Path
) -> None:
    from diffusers.quantizers.gguf.utils import GGUFLinear

    from shared.model.lora import attach_lora

    path = write("Q8_0", v2, tmp_path / "q8.gguf")
    ours = load_transformer(v2, "edit-v2", transformer=str(path))
    stock = load_transformer(v2, "edit-v2", transformer=str(path))
    for m in stock.modules():  # diffusers' own forward: F.linear on the dequantized weight
        if isinstance(m, GGUFLinear):
            m.forward = GGUFLinear.forward.__get__(m)
    for m in (ours, stock):
        attach_lora(m, 4, 4.0, 0.0, ["to_q", "to_k", "to_v", "to_out.0"], seed=1)
        m.train()
    mine, g_ours = saved_and_grads(ours)
    theirs, g_stock = saved_and_grads(stock)
    assert mine.weights == 0 and theirs.weights > 100_000  # 19 dequantized fp32 weights in the stock layers
    assert mine.total < theirs.total - theirs.weights + 1
    assert g_ours.keys() == g_stock.keys() and len(g_ours) == 16
    for n in g_ours:
        torch.testing.assert_close(g_ours[n], g_stock[n], rtol=1e-5, atol=1e-7)


def test_v21_comfy_layout_with_fused_gate_up_loads(tiny_models: Any, tmp_path: Path) -> None:
    """Qwen-Image-2.1 as ComfyUI writes it: the prefix, and each img_mlp's gate and up rows fused in one gate_up."""
    d = Path(tiny_models("v2.1"))
    sd = weights(d)
    fused: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        if ".img_mlp.gate_layer." in k:
            fused[k.replace("gate_layer", "gate_up")] = torch.cat([v, sd[k.replace("gate_layer", "proj")]])
        elif ".img_mlp.proj." not in k:
            fused[k] = v
    ref = load_transformer(d, "v2.1").eval()
    for kind, path in (("Q8_0", tmp_path / "c.gguf"), ("fp8_scaled", tmp_path / "c.safetensors")):
        if kind == "Q8_0":
            write_gguf({"model.diffusion_model." + k: v for k, v in fused.items()}, path, kind)
        else:
            write_comfy_safetensors(fused, path, kind)
        tf = inspect_transformer_file(path, "v2.1", transformer_config(d, "v2.1"))
        assert not any("gate_up" in t.name for t in tf.tensors)
        m = load_transformer(d, "v2.1", transformer=str(path)).eval()
        gate = m.transformer_blocks[0].img_mlp.gate_layer
        want = sd["transformer_blocks.0.img_mlp.gate_layer.weight"]
        assert rel_err(gate.weight_of(torch.float32), want) < 0.05  # the gate rows, not the up rows
        g = torch.Generator().manual_seed(0)
        kw = dict(
            hidden_states=torch.randn(1, 16, ref.config.in_channels, generator=g),
            encoder_hidden_states=torch.randn(1, 6, ref.config.context_in_dim, generator=g),
            timestep=torch.tensor([0.5]),
            img_shapes=[[(1, 4, 4)]],
            img_mask=torch.cat([torch.zeros(1, 6, dtype=torch.bool), torch.ones(1, 4, dtype=torch.bool)], 1),
            return_dict=False,
        )
        with torch.no_grad():
            err = rel_err(m(**kw)[0], ref(**kw)[0])
        assert err < TOLERANCE[kind], (kind, err)


# ------------------------------------------------------------------------------------------------------- errors
def check(path: Path, v2: Path, flavour: str = "edit-v2") -> str:
    with pytest.raises(InvalidInput) as e:
        inspect_transformer_file(path, flavour, transformer_config(v2, flavour))
    assert str(path) in str(e.value)
    return str(e.value)


def test_a_cut_short_or_foreign_gguf_is_named(v2: Path, tmp_path: Path) -> None:
    good = write("Q8_0", v2, tmp_path / "good.gguf")
    data = good.read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[: len(data) // 2])
    assert "cut short: tensor" in check(tmp_path / "cut.gguf", v2)
    (tmp_path / "head.gguf").write_bytes(data[:40])
    assert "not a complete GGUF file" in check(tmp_path / "head.gguf", v2)
    (tmp_path / "text.gguf").write_bytes(b"<html>404 not found</html>")
    assert "not a GGUF file" in check(tmp_path / "text.gguf", v2)
    write_gguf(weights(v2), tmp_path / "flux.gguf", "Q8_0", arch="flux")
    assert "'flux' model" in check(tmp_path / "flux.gguf", v2)


def test_a_type_the_loader_cannot_dequantize_names_the_tensor(v2: Path, tmp_path: Path) -> None:
    sd = weights(v2)
    name = "transformer_blocks.1.img_mlp.net.2.weight"  # 256 columns: a TQ1_0 block
    write_gguf(sd, tmp_path / "tq.gguf", "Q8_0", overrides={name: "TQ1_0"})
    msg = check(tmp_path / "tq.gguf", v2)
    assert f"tensor {name} is TQ1_0" in msg and "Q8_0" in msg
    # a type id no gguf package knows: the tensor table's type field of one tensor set to 250
    data = bytearray((tmp_path / "tq.gguf").read_bytes())
    needle = name.encode()
    at = data.index(needle) + len(needle)
    n_dims = struct.unpack_from("<I", data, at)[0]
    struct.pack_into("<I", data, at + 4 + 8 * n_dims, 250)
    (tmp_path / "unknown.gguf").write_bytes(bytes(data))
    assert f"tensor {name} has quantization type id 250" in check(tmp_path / "unknown.gguf", v2)


def test_a_file_of_another_flavour_or_model_is_refused(v2: Path, tiny_models: Any, tmp_path: Path) -> None:
    other = write("Q8_0", Path(tiny_models("v2.1")), tmp_path / "v21.gguf")
    msg = check(other, v2)
    assert "not the QwenImageTransformer2DModel of flavour edit-v2" in msg and "missing" in msg
    sd = weights(v2)
    sd["transformer_blocks.0.attn.to_q.weight"] = torch.zeros(32, 64)
    write_gguf(sd, tmp_path / "shape.gguf", "Q8_0")
    assert "transformer_blocks.0.attn.to_q.weight: (32, 64) in the file, (64, 64) in the model" in check(
        tmp_path / "shape.gguf", v2
    )


def test_comfyui_formats_other_than_fp8_are_refused(v2: Path, tmp_path: Path) -> None:
    path = write("fp8", v2, tmp_path / "nv.safetensors")
    sd = load_file(str(path))
    conf = torch.tensor(list(json.dumps({"format": "nvfp4"}).encode()), dtype=torch.uint8)
    sd["model.diffusion_model.transformer_blocks.0.attn.to_q.comfy_quant"] = conf
    save_file(sd, str(path))
    assert "layer model.diffusion_model.transformer_blocks.0.attn.to_q is quantized as 'nvfp4'" in check(path, v2)
    (tmp_path / "cut.safetensors").write_bytes(path.read_bytes()[:500])
    assert "not a complete safetensors file" in check(tmp_path / "cut.safetensors", v2)


def test_a_missing_file_names_where_it_was_looked_for(v2: Path, tmp_path: Path, monkeypatch: Any) -> None:
    monkeypatch.setenv("EDITTUNER_MODEL_DIR", str(tmp_path / "models"))
    with pytest.raises(InvalidInput) as e:
        load_transformer(v2, "edit-v2", transformer="qwen-edit-Q8_0.gguf")
    assert "pretrained_transformer_model_name_or_path: 'qwen-edit-Q8_0.gguf' was not found" in str(e.value)
    assert str(tmp_path / "models" / "qwen-edit-Q8_0.gguf") in str(e.value)
    (tmp_path / "models").mkdir()
    write("Q8_0", v2, tmp_path / "models" / "qwen-edit-Q8_0.gguf")
    m = load_transformer(v2, "edit-v2", transformer="qwen-edit-Q8_0.gguf")  # found under EDITTUNER_MODEL_DIR
    assert set(file_quantized_layers(m).values()) == {"Q8_0"}


def test_the_model_folder_needs_only_the_transformer_config(v2: Path, tmp_path: Path) -> None:
    """A user with the GGUF keeps the folder's VAE and text encoder, and transformer/config.json without weights."""
    folder = tmp_path / "model"
    shutil.copytree(v2, folder)
    (folder / "transformer" / "diffusion_pytorch_model.safetensors").unlink()
    path = write("Q8_0", v2, tmp_path / "q8.gguf")
    m = load_transformer(folder, "edit-v2", transformer=str(path))
    assert len(file_quantized_layers(m)) == 34
    (folder / "transformer" / "config.json").unlink()
    with pytest.raises(InvalidInput, match="transformer/config.json"):
        load_transformer(folder, "edit-v2", transformer=str(path))


# ------------------------------------------------------------------------------------- the config's file, served
def test_edittuner_check_names_the_files_types_and_services_read_it_only_under_their_model_roots(
    tiny_models: Any, tmp_path: Path, capsys: Any, monkeypatch: Any
) -> None:
    from shared.cli.main import main
    from shared.config.loading import load_run_config
    from shared.data.synthetic import write_configs, write_dataset
    from shared.errors import ConfigError
    from shared.service.common import ServerPaths

    model = Path(tiny_models("edit-v2"))
    models = tmp_path / "models"
    models.mkdir()
    write("Q8_0", model, models / "qwen-edit-Q8_0.gguf")
    root = write_dataset(tmp_path / "data", n=2, references=1)
    monkeypatch.setenv("EDITTUNER_MODEL_DIR", str(models))
    cfg, _ = write_configs(
        tmp_path / "cfg",
        root,
        model,
        "edit-v2",
        1,
        pretrained_transformer_model_name_or_path="qwen-edit-Q8_0.gguf",
        base_model_precision="int8-quanto",
    )
    assert main(["check", "--config", str(cfg), "--store", str(tmp_path / "store")]) == 0
    out = capsys.readouterr().out
    assert (
        f"transformer {models / 'qwen-edit-Q8_0.gguf'}: GGUF (qwen_image): Q8_0 ×34 354.7 kB, F32 ×43 18.3 kB; its "
        "Linears keep the file's types (base_model_precision int8-quanto is not applied)"
    ) in out
    run = load_run_config(cfg)
    ServerPaths(dataset_roots=("/",), model_roots=(str(model), str(models))).check(run)  # found under the model dir
    with pytest.raises(ConfigError) as e:
        ServerPaths(dataset_roots=("/",), model_roots=(str(model),)).check(run)
    [problem] = e.value.problems
    assert problem.where.endswith("$.pretrained_transformer_model_name_or_path")
    assert "place the transformer file under EDITTUNER_MODEL_DIR" in problem.message
    # a file the loader cannot read fails the check, naming it, before anything runs
    (models / "qwen-edit-Q8_0.gguf").write_bytes(b"GGUF\x03\x00\x00\x00")
    assert main(["check", "--config", str(cfg), "--store", str(tmp_path / "store")]) != 0
    assert "qwen-edit-Q8_0.gguf: not a complete GGUF file" in capsys.readouterr().err


def test_a_transformer_folder_with_or_without_subfolder(v2: Path, tmp_path: Path, reference: torch.Tensor) -> None:
    """SimpleTuner's other use of the option: a diffusers transformer folder (its subfolder, or "none": the folder)."""
    shutil.copytree(v2 / "transformer", tmp_path / "tuned" / "transformer")
    for value, sub in ((tmp_path / "tuned", "transformer"), (tmp_path / "tuned" / "transformer", "none")):
        m = load_transformer(v2, "edit-v2", transformer=str(value), subfolder=sub).eval()
        with torch.no_grad():
            torch.testing.assert_close(m(**inputs(m))[0], reference)
    with pytest.raises(InvalidInput, match="cannot load the transformer of"):
        load_transformer(v2, "edit-v2", transformer=str(tmp_path / "tuned"), subfolder="none")


def test_todays_comfyui_fp8_names_and_e5m2(v2: Path, reference: torch.Tensor, tmp_path: Path) -> None:
    """ComfyUI's current names (``weight_scale``, a ``comfy_quant`` JSON per layer, ``input_scale``) and a plain
    float8_e5m2 file load as the legacy fp8_scaled file does; a per-channel scale is refused."""
    legacy = load_file(str(write("fp8_scaled", v2, tmp_path / "legacy.safetensors")))
    conf = torch.tensor(list(json.dumps({"format": "float8_e4m3fn"}).encode()), dtype=torch.uint8)
    today: dict[str, torch.Tensor] = {}
    for k, v in legacy.items():
        if k.endswith(".scale_weight"):
            layer = k[: -len(".scale_weight")]
            today[layer + ".weight_scale"] = v
            today[layer + ".input_scale"] = torch.tensor(1.0)
            today[layer + ".comfy_quant"] = conf.clone()
        elif not k.endswith("scaled_fp8"):
            today[k] = v
    save_file(today, str(tmp_path / "today.safetensors"))
    e5 = {k: (v.to(torch.float8_e5m2) if v.ndim == 2 else v.bfloat16()) for k, v in weights(v2).items()}
    save_file(e5, str(tmp_path / "e5m2.safetensors"))
    for name, bound in (("today", TOLERANCE["fp8_scaled"]), ("e5m2", 0.1)):
        m = load_transformer(v2, "edit-v2", transformer=str(tmp_path / f"{name}.safetensors")).eval()
        assert len(file_quantized_layers(m)) == 34
        with torch.no_grad():
            err = rel_err(m(**inputs(m))[0], reference)
        assert err < bound, (name, err)
    today["model.diffusion_model.transformer_blocks.0.attn.to_q.weight_scale"] = torch.ones(64)
    save_file(today, str(tmp_path / "channels.safetensors"))
    assert "only per-tensor fp8 scales are read here" in check(tmp_path / "channels.safetensors", v2)


def test_comfyuis_2511_marker_is_read_as_edit_v3(tiny_models: Any, tmp_path: Path) -> None:
    """Comfy-Org's Qwen-Image-Edit-2511 files carry an empty ``__index_timestep_zero__`` tensor: skipped for edit-v3,
    and a clear error for another flavour (the file is edit-v3's: its references are modulated at t=0)."""
    v3 = Path(tiny_models("edit-v3"))
    path = write("fp8_scaled", v3, tmp_path / "2511.safetensors")
    sd = load_file(str(path))
    sd["model.diffusion_model.__index_timestep_zero__"] = torch.tensor([])
    save_file(sd, str(path))
    m = load_transformer(v3, "edit-v3", transformer=str(path))
    assert len(file_quantized_layers(m)) == 34 and m.zero_cond_t
    msg = check(path, Path(tiny_models("edit-v2")))
    assert "it is Qwen-Image-Edit-2511, model_flavour edit-v3, not edit-v2" in msg
