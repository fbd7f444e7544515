"""DoRA, PiSSA, CorDA and DyLoRA against their maths and against Hugging Face PEFT."""

from __future__ import annotations

import json

import pytest
import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora.config import CordaConfig
from peft.tuners.lora.corda import collect_eigens_for_layer, preprocess_corda
from peft.tuners.lora.layer import Linear as PeftLoraLinear
from safetensors.torch import load_file
from torch import nn

from engine.methods import TrainContext, build_method
from engine.methods.corda import InputCovariance, context_factors, damped_inverse
from engine.methods.dora import PEFT_NAMES as DORA_PEFT_NAMES
from engine.methods.dora import DoRALinear
from engine.methods.dylora import DyLoRALinear
from engine.methods.lora import LoRALinear
from engine.methods.pissa import PiSSALinear, principal_factors
from engine.models import load_model
from tests.conftest import tiny_text_batch, train_tiny

PEFT_TARGETS = ["query", "value"]


def _twins(num_labels: int = 3):
    """Two tiny-bert models with identical weights: ours and the one PEFT adapts."""
    torch.manual_seed(0)
    ours = load_model("tiny-bert", num_labels)
    theirs = load_model("tiny-bert", num_labels)
    theirs.load_state_dict(ours.state_dict())
    return ours, theirs


def _peft_layer(peft_net, our_name: str):
    return peft_net.base_model.model.get_submodule(our_name.removeprefix("net."))


def _peft_logits(peft_net, batch):
    return peft_net(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def _align_signs(ours: torch.Tensor, theirs: torch.Tensor, dim: int) -> torch.Tensor:
    """Flip each singular component of ``ours`` (a row if dim=1, a column if dim=0) to agree with ``theirs``."""
    signs = torch.sign((ours * theirs).sum(dim=dim, keepdim=True))
    return ours * signs


def _assert_same_svd_init(a: torch.Tensor, b: torch.Tensor, base: torch.Tensor, peft_layer, rtol: float) -> None:
    """Our factors ``a`` (r × d_in), ``b`` (d_out × r) and frozen residual ``base`` equal PEFT's layer, up to the
    sign of each singular component."""
    their_a, their_b = peft_layer.lora_A["default"].weight, peft_layer.lora_B["default"].weight
    torch.testing.assert_close(_align_signs(a, their_a, 1), their_a, atol=1e-5, rtol=rtol)
    torch.testing.assert_close(_align_signs(b, their_b, 0), their_b, atol=1e-5, rtol=rtol)
    torch.testing.assert_close(base, peft_layer.base_layer.weight, atol=1e-5, rtol=1e-5)


def _calibration_batches(seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Two padded text batches (right padding of different lengths, as the data loader produces)."""
    batches = []
    for k in range(2):
        batch = tiny_text_batch(None, n=4, length=9, seed=seed + k)
        batch["attention_mask"][1, -4:] = 0
        batch["attention_mask"][2, -1:] = 0
        batches.append(batch)
    return batches


def _calibrate(method, model, batches) -> None:
    ctx = TrainContext(model=model, step=0, total_steps=1, loss_fn=None, batches=lambda: iter(batches))
    assert method.on_train_start(ctx) is False  # re-initialised in place: the trainable set did not change


# --- DoRA ----------------------------------------------------------------------------------------


def _dora_tensor(layer: DoRALinear, attr: str) -> torch.Tensor:
    tensor = getattr(layer, attr)
    return tensor.weight if isinstance(tensor, nn.Module) else tensor


def _dora_twins(dropout: float):
    ours, theirs = _twins()
    method = build_method("dora", {"rank": 2, "alpha": 4, "target_roles": ["q", "v"], "dropout": dropout})
    method.apply(ours)
    cfg = LoraConfig(r=2, lora_alpha=4, target_modules=PEFT_TARGETS, lora_dropout=dropout, use_dora=True)
    peft_net = get_peft_model(theirs.net, cfg)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, layer in method.adapted_layers(ours).items():
            torch.testing.assert_close(layer.dora_magnitude_vector, layer.base.weight.norm(dim=1))  # m0 = ‖W0‖_row
            layer.dora_B.weight.normal_(0, 0.3, generator=g)
            layer.dora_magnitude_vector.mul_(1 + 0.2 * torch.randn(layer.out_features, generator=g))
            peft_layer = _peft_layer(peft_net, name)
            for ours_attr, peft_attr in DORA_PEFT_NAMES.items():
                getattr(peft_layer, peft_attr)["default"].weight.copy_(_dora_tensor(layer, ours_attr))
    return ours, peft_net, method


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_dora_equals_peft_dora_outputs_and_gradients(dropout):
    ours, peft_net, method = _dora_twins(dropout)
    batch = tiny_text_batch(ours)
    ours.eval(), peft_net.eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(batch), _peft_logits(peft_net, batch), atol=1e-5, rtol=1e-5)
    # Training mode: same seed, so every dropout (BERT's and the adapter's) draws the same mask in both.
    ours.train(), peft_net.train()
    torch.manual_seed(11)
    out = ours(batch)
    torch.manual_seed(11)
    ref = _peft_logits(peft_net, batch)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(5))
    (out * weights).sum().backward()
    (ref * weights).sum().backward()
    for name, layer in method.adapted_layers(ours).items():
        peft_layer = _peft_layer(peft_net, name)
        for ours_attr, peft_attr in DORA_PEFT_NAMES.items():
            mine = _dora_tensor(layer, ours_attr).grad
            theirs = getattr(peft_layer, peft_attr)["default"].weight.grad
            torch.testing.assert_close(mine, theirs, atol=1e-6, rtol=1e-4)
            assert mine.abs().sum() > 0


def test_dora_norm_is_detached_in_backward():
    torch.manual_seed(0)
    layer = DoRALinear(nn.Linear(6, 5), rank=2, scaling=1.5)
    with torch.no_grad():
        layer.dora_B.weight.normal_()
    x = torch.randn(4, 6)
    upstream = torch.randn(4, 5)
    (layer(x) * upstream).sum().backward()

    def manual_grads(detach_norm: bool) -> list[torch.Tensor]:
        a = layer.dora_A.weight.detach().clone().requires_grad_()
        b = layer.dora_B.weight.detach().clone().requires_grad_()
        m = layer.dora_magnitude_vector.detach().clone().requires_grad_()
        direction = layer.base.weight + 1.5 * b @ a
        norm = direction.norm(dim=1, keepdim=True)
        weight = m[:, None] * direction / (norm.detach() if detach_norm else norm)
        ((x @ weight.T + layer.base.bias) * upstream).sum().backward()
        return [a.grad, b.grad, m.grad]

    ours = [layer.dora_A.weight.grad, layer.dora_B.weight.grad, layer.dora_magnitude_vector.grad]
    for mine, expected in zip(ours, manual_grads(detach_norm=True)):
        torch.testing.assert_close(mine, expected, atol=1e-6, rtol=1e-5)
    # The non-detached gradient is measurably different, so the check above can fail.
    assert (ours[0] - manual_grads(detach_norm=False)[0]).abs().max() > 1e-3


def test_dora_merge_and_count():
    ours, _, method = _dora_twins(0.0)
    ours.eval()
    batch = tiny_text_batch(ours)
    layer = next(iter(method.adapted_layers(ours).values()))
    w = layer.adapted_weight()
    torch.testing.assert_close(w.norm(dim=1), layer.dora_magnitude_vector.detach())  # ‖W'‖_row = m
    d_in, d_out, r = 32, 32, 2
    assert method.adapter_param_count(ours) == 4 * (r * (d_in + d_out) + d_out)
    with torch.no_grad():
        before = ours(batch)
        method.merge(ours)
        torch.testing.assert_close(ours(batch), before, atol=1e-5, rtol=1e-5)


# --- PiSSA ---------------------------------------------------------------------------------------


def test_pissa_equals_peft_pissa_init():
    ours, theirs = _twins()
    base = load_model("tiny-bert", 3).eval()  # same weights: load_model seeds its initialisation
    method = build_method("pissa", {"rank": 3, "alpha": 6, "target_roles": ["q", "v"]})
    method.apply(ours)
    cfg = LoraConfig(r=3, lora_alpha=6, target_modules=PEFT_TARGETS, init_lora_weights="pissa")
    peft_net = get_peft_model(theirs.net, cfg)
    ours.eval(), peft_net.eval()
    batch = tiny_text_batch(ours)
    with torch.no_grad():
        for name, layer in method.adapted_layers(ours).items():
            peft_layer = _peft_layer(peft_net, name)
            _assert_same_svd_init(layer.pissa_A.weight, layer.pissa_B.weight, layer.base.weight, peft_layer, 1e-5)
        # At init the adapted model is the base model: W0 − sBA + sBA = W0.
        expected = base(batch)
        torch.testing.assert_close(ours(batch), expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(_peft_logits(peft_net, batch), expected, atol=1e-5, rtol=1e-5)
        # After the same change to B in both, the outputs still agree.
        g = torch.Generator().manual_seed(1)
        for name, layer in method.adapted_layers(ours).items():
            peft_layer = _peft_layer(peft_net, name)
            layer.pissa_B.weight.add_(0.1 * torch.randn(layer.pissa_B.weight.shape, generator=g))
            peft_layer.lora_A["default"].weight.copy_(layer.pissa_A.weight)
            peft_layer.lora_B["default"].weight.copy_(layer.pissa_B.weight)
        out = ours(batch)
        torch.testing.assert_close(out, _peft_logits(peft_net, batch), atol=1e-5, rtol=1e-5)
        assert (out - expected).abs().max() > 1e-4


def test_pissa_randomized_svd_equals_peft_niter():
    torch.manual_seed(0)
    linear = nn.Linear(24, 16)
    ours = PiSSALinear(nn.Linear(24, 16), rank=3, scaling=2.0)
    ours.base.load_state_dict(linear.state_dict())
    theirs = PeftLoraLinear(linear, adapter_name="default", config=LoraConfig(r=3, lora_alpha=6), r=3, lora_alpha=6)
    torch.manual_seed(7)  # the randomized SVD draws from the global generator
    ours.initialise_from(*principal_factors(ours.base.weight, 3, 2.0, svd_niter=2))
    torch.manual_seed(7)
    theirs.pissa_init("default", "pissa_niter_2")
    torch.testing.assert_close(ours.pissa_A.weight, theirs.lora_A["default"].weight, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours.pissa_B.weight, theirs.lora_B["default"].weight, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours.base.weight, theirs.base_layer.weight, atol=1e-5, rtol=1e-5)


def test_pissa_factors_are_principal_components():
    torch.manual_seed(0)
    model = load_model("tiny-vit", 4)
    w0 = {l.name: l.module.weight.detach().clone() for l in model.adaptable_layers(["q", "fc1"])}
    method = build_method("pissa", {"rank": 2, "alpha": 4, "target_roles": ["q", "fc1"]})
    method.apply(model)
    for name, layer in method.adapted_layers(model).items():
        u, s, vh = torch.linalg.svd(w0[name])
        top2 = u[:, :2] @ torch.diag(s[:2]) @ vh[:2]
        torch.testing.assert_close(layer.delta_weight(), top2, atol=1e-5, rtol=1e-4)  # s B A = U_r S_r V_rᵀ
        torch.testing.assert_close(layer.pretrained_weight(), w0[name], atol=1e-5, rtol=1e-5)
        # The residual's spectrum is W0's without its top two values.
        residual_s = torch.linalg.svdvals(layer.effective_base_weight())
        torch.testing.assert_close(residual_s[: len(s) - 2], s[2:], atol=1e-4, rtol=1e-4)


# --- CorDA ---------------------------------------------------------------------------------------


def _corda_twins(mode: str):
    ours, theirs = _twins()
    method = build_method("corda", {"rank": 2, "alpha": 4, "target_roles": ["q", "v"], "mode": mode})
    method.apply(ours)
    batches = _calibration_batches()
    _calibrate(method, ours, batches)

    def run_model():  # PEFT's protocol: one unpadded sequence per forward
        for batch in batches:
            for ids, mask in zip(batch["input_ids"], batch["attention_mask"]):
                length = int(mask.sum())
                theirs.net(input_ids=ids[None, :length], attention_mask=torch.ones(1, length, dtype=torch.long))

    cfg = LoraConfig(
        r=2, lora_alpha=4, target_modules=PEFT_TARGETS, init_lora_weights="corda",
        corda_config=CordaConfig(corda_method=mode),
    )  # fmt: skip
    preprocess_corda(theirs.net, cfg, run_model=run_model)
    return ours, get_peft_model(theirs.net, cfg), method


@pytest.mark.parametrize("mode", ["ipm", "kpm"])
def test_corda_equals_peft_corda_init(mode):
    ours, peft_net, method = _corda_twins(mode)
    base = load_model("tiny-bert", 3).eval()  # same weights: load_model seeds its initialisation
    ours.eval(), peft_net.eval()
    batch = tiny_text_batch(ours)
    with torch.no_grad():
        for name, layer in method.adapted_layers(ours).items():
            peft_layer = _peft_layer(peft_net, name)
            _assert_same_svd_init(layer.corda_A.weight, layer.corda_B.weight, layer.base.weight, peft_layer, 1e-4)
            assert layer.corda_B.weight.abs().sum() > 0  # calibrated, not the LoRA-style B = 0
        # Both adapted models equal the base model at init (W0 − sBA + sBA = W0) and each other.
        torch.testing.assert_close(ours(batch), base(batch), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ours(batch), _peft_logits(peft_net, batch), atol=1e-5, rtol=1e-5)


def test_corda_factors_equal_peft_given_the_same_covariance():
    torch.manual_seed(0)
    linear = nn.Linear(12, 10)
    x = torch.randn(5, 12) * torch.logspace(-3, 1, 12)  # rank-5, badly scaled: damping must do real work
    covariance = x.T @ x
    err_first = torch.dist((covariance + torch.eye(12) * covariance.diag().mean() * 0.01) @ torch.linalg.inv(
        covariance + torch.eye(12) * covariance.diag().mean() * 0.01), torch.eye(12)).item()  # fmt: skip
    tolerance = max(err_first / 10, 1e-6)
    for mode in ["ipm", "kpm"]:
        linear.covariance_matrix = covariance
        cfg = LoraConfig(r=3, lora_alpha=6, init_lora_weights="corda", corda_config=CordaConfig(corda_method=mode))
        eigens = collect_eigens_for_layer(linear, cfg)
        keep = slice(0, 3) if mode == "ipm" else slice(-3, None)
        scale = 6 / 3
        their_a = eigens.V_WC[:, keep].T * (eigens.S_WC[keep] / scale).sqrt()[:, None]
        their_b = eigens.U_WC[:, keep] * (eigens.S_WC[keep] / scale).sqrt()[None, :]
        a, b, summary = context_factors(linear.weight, covariance, 3, mode, scale, damping=0.01, tolerance=0.05)
        torch.testing.assert_close(_align_signs(a, their_a, 1), their_a, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(_align_signs(b, their_b, 0), their_b, atol=1e-5, rtol=1e-4)
    # A stricter tolerance forces λ to double at least once; the result then inverts within it.
    damped, inverse, lam = damped_inverse(covariance, 0.01, tolerance)
    assert lam > 0.01 and torch.dist(damped @ inverse, torch.eye(12)).item() < tolerance
    with pytest.raises(ValueError, match="did not invert"):
        damped_inverse(covariance, 0.01, 0.0)


def test_corda_covariance_drops_padding_and_normalises_per_sample():
    acc = InputCovariance(3, "max", torch.device("cpu"))
    x = torch.tensor([[[1.0, 2.0, 0.0], [0.0, 4.0, 1.0], [9.0, 9.0, 9.0]]])  # last token is padding
    acc.add(x, torch.tensor([[1, 1, 0]]))
    kept = x[0, :2] / 4.0
    torch.testing.assert_close(acc.mean(), kept.T @ kept)


def test_corda_modes_pick_opposite_components_and_adapter_reload_restores_residual():
    deltas, covariances = {}, {}
    for mode in ["ipm", "kpm"]:
        torch.manual_seed(0)
        model = load_model("tiny-bert", 3)
        method = build_method("corda", {"rank": 2, "alpha": 4, "target_roles": ["q", "v"], "mode": mode})
        method.apply(model)
        covariances = method.collect_covariances(model, lambda: iter(_calibration_batches()))
        method.initialise_from_covariances(model, covariances)
        deltas[mode] = {n: l.delta_weight().detach() for n, l in method.adapted_layers(model).items()}
        spectra = {n: torch.tensor(s["singular_values"]) for n, s in method.calibration.items()}
        if mode == "kpm":
            kpm_model, kpm_method = model, method
    for name, cov in covariances.items():
        damped, _, _ = damped_inverse(cov, 0.01, 0.05)
        ipm_energy, kpm_energy = ((deltas[m][name] @ damped).norm() for m in ("ipm", "kpm"))
        # ‖s B A C_λ‖_F = ‖Σ_r‖: the top r singular values for ipm, the bottom r for kpm.
        torch.testing.assert_close(ipm_energy, spectra[name][:2].norm(), rtol=1e-3, atol=1e-5)
        torch.testing.assert_close(kpm_energy, spectra[name][-2:].norm(), rtol=1e-3, atol=1e-4)
        assert ipm_energy > 10 * kpm_energy
    # A calibrated adapter loaded into a freshly built (uncalibrated) model brings its residual with it.
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for layer in kpm_method.adapted_layers(kpm_model).values():
            layer.corda_B.weight.add_(0.05 * torch.randn(layer.corda_B.weight.shape, generator=g))
    kpm_model.eval()
    batch = tiny_text_batch(kpm_model)
    with torch.no_grad():
        expected = kpm_model(batch)
    torch.manual_seed(1)
    fresh = load_model("tiny-bert", 3)
    fresh_method = build_method("corda", kpm_method.config.model_dump())
    fresh_method.apply(fresh)
    fresh.eval()
    fresh_method.load_adapter_state_dict(fresh, kpm_method.adapter_state_dict(kpm_model))
    with torch.no_grad():
        torch.testing.assert_close(fresh(batch), expected, atol=1e-5, rtol=1e-5)
        for name, layer in fresh_method.adapted_layers(fresh).items():
            original = kpm_method.adapted_layers(kpm_model)[name]
            torch.testing.assert_close(layer.base.weight, original.base.weight, atol=1e-6, rtol=1e-6)
            torch.testing.assert_close(layer.pretrained_weight(), original.pretrained_weight(), atol=1e-6, rtol=1e-6)


# --- DyLoRA --------------------------------------------------------------------------------------


def _dylora_layer(frozen: bool = False) -> DyLoRALinear:
    torch.manual_seed(0)
    layer = DyLoRALinear(nn.Linear(7, 5), max_rank=4, alpha=8.0, dropout=0.0, frozen=frozen, eval_rank=4)
    with torch.no_grad():
        for col in layer.dylora_B:
            col.normal_()
    return layer


def test_dylora_rank_b_equals_lora_of_rank_b_with_leading_factors():
    layer = _dylora_layer()
    b_full, a_full = layer.factor_matrices()
    x = torch.randn(3, 6, 7)
    for rank in range(1, 5):
        lora = LoRALinear(layer.base, rank=rank, scaling=8.0 / rank)
        with torch.no_grad():
            lora.lora_A.weight.copy_(a_full[:rank])
            lora.lora_B.weight.copy_(b_full[:, :rank])
            layer.eval_rank = rank
            layer.eval()
            torch.testing.assert_close(layer(x), lora(x))
            layer.train_rank = rank
            layer.train()
            torch.testing.assert_close(layer(x), lora(x))
            torch.testing.assert_close(layer.delta_weight(), lora.delta_weight())
            scaled_b, a = layer.low_rank_factors(rank)
            torch.testing.assert_close(scaled_b @ a, lora.delta_weight())
            merged = layer.merged()
            torch.testing.assert_close(merged(x), lora(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("frozen", [True, False])
def test_dylora_step_updates_only_the_components_of_the_sampled_rank(frozen):
    layer = _dylora_layer(frozen)
    before_a = [p.detach().clone() for p in layer.dylora_A]
    before_b = [p.detach().clone() for p in layer.dylora_B]
    optimizer = torch.optim.AdamW([p for p in layer.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    layer.train()
    layer.train_rank = 3
    for _ in range(2):  # a second step: momentum from the first must not leak into other components
        layer(torch.randn(8, 7)).pow(2).sum().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    trained = {2} if frozen else {0, 1, 2}  # 0-based: the b-th component is index b - 1
    for i in range(4):
        changed_a = not torch.equal(layer.dylora_A[i], before_a[i])
        changed_b = not torch.equal(layer.dylora_B[i], before_b[i])
        assert changed_a == (i in trained) and changed_b == (i in trained), f"component {i}"


def test_dylora_hooks_sample_ranks_and_eval_rank_sweep():
    torch.manual_seed(0)
    model = load_model("tiny-bert", 3)
    method = build_method("dylora", {"rank": 4, "min_rank": 2, "alpha": 8, "rank_seed": 3})
    method.apply(model)
    ctx = TrainContext(model=model, step=0, total_steps=40, loss_fn=None, batches=None)
    assert method.on_train_start(ctx) is False
    ranks = []
    for step in range(1, 41):
        ranks.append(method.training_rank)
        assert all(l.train_rank == method.training_rank for l in method.adapted_layers(model).values())
        ctx.step = step
        assert method.on_step_end(ctx) is False
    assert set(ranks) == {2, 3, 4}
    again = build_method("dylora", {"rank": 4, "min_rank": 2, "alpha": 8, "rank_seed": 3})
    assert [again.sample_training_rank(s) for s in range(40)] == ranks  # a function of (seed, step)
    assert sum(method.artifacts(model)["training_rank_counts"].values()) == 40
    # Evaluation rank: every layer follows, merge happens at it, state round-trips.
    assert method.evaluation_ranks() == [2, 3, 4]
    method.set_eval_rank(model, 1)
    assert all(l.eval_rank == 1 for l in method.adapted_layers(model).values())
    fresh_method = build_method("dylora", method.config.model_dump())
    fresh = load_model("tiny-bert", 3)
    fresh_method.apply(fresh)
    fresh_method.load_state(fresh, method.state())
    assert all(l.eval_rank == 1 for l in fresh_method.adapted_layers(fresh).values())
    with pytest.raises(ValueError, match="1..4"):
        method.set_eval_rank(model, 5)
    with pytest.raises(ValueError):
        build_method("dylora", {"rank": 4, "eval_rank": 6})


# --- training through the one loop ---------------------------------------------------------------


def _reloaded(spec, result):
    """A fresh model (no hooks run) with the saved adapter loaded, and its evaluation data."""
    from engine.train import prepare

    prep = prepare(spec)
    prep.method.load_adapter_state_dict(prep.model, load_file(result.artifacts["adapter"]))
    return prep


def test_corda_trains_through_the_loop_and_its_adapter_reloads(tmp_path):
    from engine.train import evaluate

    spec, result, reporter = train_tiny({"name": "corda", "rank": 2, "alpha": 4, "calib_batches": 2}, tmp_path)
    assert any("corda (ipm): calibrated 4 layers on 2 batches" in m for m in reporter.messages)
    analysis = json.loads(open(result.artifacts["method_analysis"]).read())
    assert len(analysis["layers"]) == 4 and all(s["damping"] >= 0.01 for s in analysis["layers"].values())
    prep = _reloaded(spec, result)
    assert any(k.endswith("corda_initial_B") for k in load_file(result.artifacts["adapter"]))
    metrics = evaluate(prep.model, prep.data.eval, 32, prep.device)
    assert metrics["eval_loss"] == pytest.approx(result.final_metrics["eval_loss"], abs=1e-5)


def test_dylora_trains_through_the_loop_and_sweeps_eval_ranks(tmp_path):
    from engine.train import evaluate

    spec, result, _ = train_tiny({"name": "dylora", "rank": 4, "alpha": 8}, tmp_path)
    analysis = json.loads(open(result.artifacts["method_analysis"]).read())
    assert sum(analysis["training_rank_counts"].values()) == 4
    assert analysis["evaluation_ranks"] == [1, 2, 3, 4]
    prep = _reloaded(spec, result)
    losses = {}
    for rank in analysis["evaluation_ranks"]:
        prep.method.set_eval_rank(prep.model, rank)
        losses[rank] = evaluate(prep.model, prep.data.eval, 32, prep.device)["eval_loss"]
    assert losses[4] == pytest.approx(result.final_metrics["eval_loss"], abs=1e-5)
    assert len(set(losses.values())) == 4  # each rank is a different truncation


def test_corda_logits_equal_pefts_after_perturbing_b():
    """Away from initialisation (B moved, as training moves it) both models still give the same logits, and differ
    from the base model: the residual W0 − s B0 A0 and the trained s B A are combined the same way."""
    ours, peft_net, method = _corda_twins("ipm")
    base = load_model("tiny-bert", 3).eval()
    ours.eval(), peft_net.eval()
    batch = tiny_text_batch(ours)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, layer in method.adapted_layers(ours).items():
            delta = 3.0 * torch.randn(layer.corda_B.weight.shape, generator=g)
            layer.corda_B.weight.add_(delta)
            _peft_layer(peft_net, name).lora_B["default"].weight.add_(delta)
        logits = ours(batch)
        torch.testing.assert_close(logits, _peft_logits(peft_net, batch), atol=1e-5, rtol=1e-5)
        assert (logits - base(batch)).abs().max() > 1e-3  # the perturbation reaches the logits


@pytest.mark.parametrize(("method_name", "params", "keeps_initial"), [
    ("pissa", {"rank": 2, "alpha": 2.0}, False),
    ("pissa", {"rank": 2, "alpha": 2.0, "svd_niter": 2}, True),
    ("corda", {"rank": 2, "alpha": 2.0}, True),
])  # fmt: skip
def test_initial_factors_are_saved_only_where_a_fresh_model_cannot_rebuild_them(method_name, params, keeps_initial):
    torch.manual_seed(0)
    model = load_model("tiny-bert", 3).eval()
    method = build_method(method_name, {**params, "target_roles": ["q", "v"]})
    method.apply(model)
    state = method.adapter_state_dict(model)
    initial = [k for k in state if "initial_" in k]
    assert bool(initial) == keeps_initial
    adapter = [v for k, v in state.items() if k not in set(model.head_parameter_names())]
    # tiny-bert q, v: 2 blocks × 2 layers × r (32 + 32) floats, twice that with the initial factors
    assert sum(t.numel() for t in adapter) == (2 if keeps_initial else 1) * 4 * 2 * 64
    if method_name == "pissa" and not keeps_initial:  # the fresh model recomputes A0, B0 and the residual
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(0.05)
        batch = tiny_text_batch(model)
        with torch.no_grad():
            expected = model(batch)
        fresh = load_model("tiny-bert", 3).eval()
        fresh_method = build_method(method_name, {**params, "target_roles": ["q", "v"]})
        fresh_method.apply(fresh)
        fresh_method.load_adapter_state_dict(fresh, method.adapter_state_dict(model))
        with torch.no_grad():
            torch.testing.assert_close(fresh(batch), expected, atol=1e-5, rtol=1e-5)
