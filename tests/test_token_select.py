"""TokenTune on tiny random models (Llama, Mistral, Qwen2, Qwen3, Gemma): five invariants of its split forward
(numbered below), plus the selection rules."""

from __future__ import annotations

import io

import pytest
import torch
import torch.nn.functional as F

from tests.conftest import make_tiny_causal_lm
from tokentune.config import ConfigError, RunConfig
from tokentune.methods import REGISTRY, MethodStack, StepContext
from tokentune.methods.tokentune.decoder import selected_logits
from tokentune.methods.tokentune.encoder import encoder_hidden, tokentune_encoder_forward
from tokentune.methods.tokentune.method import (
    SUPPORTED,
    TokenTune,
    TokenTuneSettings,
    num_selected,
    select_labelled,
    select_tokens,
    supervised_positions,
    tokentune_loss,
)
from tokentune.methods.tokentune.split_forward import validate_mask

VOCAB = 128
LENGTHS = (14, 9, 5)  # right padding to 14


pytestmark = pytest.mark.usefixtures("one_thread")


def make_batch(lengths=LENGTHS, vocab=VOCAB, prompt=2, seed=0, pad_id=0):
    """Right-padded batch: labels -100 on the first ``prompt`` tokens and on padding."""
    g = torch.Generator().manual_seed(seed)
    length = max(lengths)
    ids = torch.randint(3, vocab, (len(lengths), length), generator=g)
    mask = (torch.arange(length)[None] < torch.tensor(lengths)[:, None]).long()
    ids = ids.masked_fill(mask == 0, pad_id)
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :prompt] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def make_decoder(family, dtype=torch.float64):
    """conftest's tiny decoders; Gemma with one kv head (multi-query attention)."""
    return make_tiny_causal_lm(family, dtype=dtype, kv_heads=1 if family == "gemma" else 2)


def draw(batch, ratio, seed=0):
    return select_tokens(batch["attention_mask"], ratio, generator=torch.Generator().manual_seed(seed))


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def loss_and_grads(model, fn):
    model.zero_grad(set_to_none=True)
    loss = fn()
    loss.backward()
    return loss.detach(), grads(model)


def assert_grads_close(got, want, atol=1e-10, rtol=1e-8):
    assert got.keys() == want.keys() and got
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=atol, rtol=rtol, msg=name)


def next_token_ce(logits, batch, positions):
    """Float64 mean cross-entropy of logits[b, i] vs labels[b, i + 1] over ``positions`` with a label."""
    labels, mask = batch["labels"], batch["attention_mask"].bool()
    target = torch.full_like(labels, -100)
    target[:, :-1] = torch.where(mask[:, 1:], labels[:, 1:], -100)
    keep = positions & (target != -100)
    return F.cross_entropy(logits[keep].double(), target[keep])


# ---- invariant 1: logits at S positions equal the stock model's ---------------------------------
@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3", "gemma"])
def test_selected_logits_equal_stock(family):
    model = make_decoder(family)
    if family == "mistral":
        model.config.sliding_window = 4  # exercises the sliding-window mask (L = 14)
    batch = make_batch()
    selected = draw(batch, 0.4)
    with torch.no_grad():
        stock = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        ours = selected_logits(model, batch, selected)
    torch.testing.assert_close(ours, stock[selected], atol=1e-12, rtol=1e-10)


# ---- invariant 2: every token selected == stock training ----------------------------------------
def checkpointed(model):
    """``model`` with every decoder layer checkpointed (the ``checkpointing`` method, prepared in place)."""
    return REGISTRY["checkpointing"](REGISTRY["checkpointing"].config_cls()).prepare(model)


@pytest.mark.parametrize("ckpt", [False, True], ids=["plain", "checkpointing"])
@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_all_selected_equals_stock_training(family, ckpt):
    model = make_tiny_causal_lm(family, dtype=torch.float64)
    batch = make_batch()
    real = batch["attention_mask"].bool()
    selected = draw(batch, 1.0)
    assert torch.equal(selected, real)

    stock_loss, stock_grads = loss_and_grads(model, lambda: next_token_ce(model(**batch).logits, batch, real))
    with torch.no_grad():  # the float64 reference is the stock loss (which HF computes in float32)
        torch.testing.assert_close(model(**batch).loss.double(), stock_loss, atol=1e-6, rtol=1e-6)
    model = checkpointed(model) if ckpt else model  # the selected stream recomputed in backward
    loss, ours = loss_and_grads(model, lambda: tokentune_loss(model, batch, selected))
    torch.testing.assert_close(loss, stock_loss, atol=1e-12, rtol=1e-12)
    assert_grads_close(ours, stock_grads)
    assert len(ours) == len(list(model.parameters()))


# ---- invariant 3: gradients == stop-gradient on R hidden states, keys and values ----------------
def stop_gradient_reference(model, batch, selected, detach_kv=True):
    """Stock forward with hooks detaching R rows of embeddings, layer outputs, keys and values."""
    rest = batch["attention_mask"].bool() & ~selected

    def detach_rest(_module, _inputs, out):
        r = rest.view(*rest.shape, *([1] * (out.dim() - 2)))
        return torch.where(r, out.detach(), out)

    inner = model.model
    hooked = [inner.embed_tokens, *inner.layers]
    for layer in inner.layers:
        attn = layer.self_attn
        if detach_kv:
            hooked += [getattr(attn, "k_norm", attn.k_proj), attn.v_proj]  # keys after Qwen3's k_norm
    handles = [m.register_forward_hook(detach_rest) for m in hooked]
    try:
        return next_token_ce(model(**batch).logits, batch, selected)
    finally:
        for h in handles:
            h.remove()


@pytest.mark.parametrize("ckpt", [False, True], ids=["plain", "checkpointing"])
@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_gradients_equal_stop_gradient_reference(family, ckpt):
    model = make_tiny_causal_lm(family, dtype=torch.float64)
    batch = make_batch()
    selected = draw(batch, 0.4, seed=3)
    ref_loss, ref = loss_and_grads(model, lambda: stop_gradient_reference(model, batch, selected))
    # the reference is discriminating: without the stop-gradient on R keys/values, W_k differs
    _, leaky = loss_and_grads(model, lambda: stop_gradient_reference(model, batch, selected, detach_kv=False))
    model = checkpointed(model) if ckpt else model  # the selected stream recomputed in backward
    loss, ours = loss_and_grads(model, lambda: tokentune_loss(model, batch, selected))
    torch.testing.assert_close(loss, ref_loss, atol=1e-12, rtol=1e-12)
    assert_grads_close(ours, ref)
    name = "model.layers.0.self_attn.k_proj.weight"
    assert not torch.allclose(leaky[name], ours[name], atol=1e-8)


# ---- invariant 4: padding never produces loss ---------------------------------------------------
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_padding_never_produces_loss(family):
    model = make_tiny_causal_lm(family, dtype=torch.float64)
    batch = make_batch()
    pad = batch["attention_mask"] == 0
    selected = draw(batch, 0.5, seed=1)
    assert not (selected & pad).any()
    loss, ours = loss_and_grads(model, lambda: tokentune_loss(model, batch, selected))

    noisy = dict(batch)  # other token ids and (non -100!) labels on padded positions
    noise = torch.randint(3, VOCAB, pad.shape, generator=torch.Generator().manual_seed(9))
    noisy["input_ids"] = torch.where(pad, noise, batch["input_ids"])
    noisy["labels"] = torch.where(pad, noise, batch["labels"])
    loss2, ours2 = loss_and_grads(model, lambda: tokentune_loss(model, noisy, selected))
    torch.testing.assert_close(loss2, loss, atol=0, rtol=0)
    assert_grads_close(ours2, ours, atol=0, rtol=0)

    # all selected: the padded batch's loss is the token-weighted mean of the unpadded sequences' losses
    total = count = 0
    for b, n in enumerate(LENGTHS):
        one = {k: v[b : b + 1, :n] for k, v in batch.items()}
        with torch.no_grad():
            logits = model(input_ids=one["input_ids"]).logits
        k = int((one["labels"][:, 1:] != -100).sum())
        total, count = (
            total + next_token_ce(logits, one, torch.ones_like(one["labels"], dtype=torch.bool)) * k,
            count + k,
        )
    with torch.no_grad():
        full = tokentune_loss(model, batch, draw(batch, 1.0))
    torch.testing.assert_close(full, total / count, atol=1e-12, rtol=1e-12)


# ---- invariant 5: trainers, quantization, gradient accumulation ---------------------------------
def train(model, names, configs, batch, steps=3, accum=2, lr=1e-2):
    """The loop of tokentune.train in miniature: ``MethodStack`` hooks, micro-batches, accumulation."""
    stack = MethodStack.build(names, configs)
    model = stack.prepare(model)
    opt = torch.optim.AdamW(stack.param_groups(model), lr=lr)
    model.eval()
    with torch.no_grad():
        before = model(**batch).loss
        all_tokens = tokentune_loss(model, batch, batch["attention_mask"].bool())
    torch.testing.assert_close(all_tokens.float(), before.float(), atol=1e-5, rtol=1e-5)
    assert all(m.compute_loss(model, batch, None) is None for m in stack)  # eval: stock forward
    model.train()
    rows = batch["input_ids"].shape[0]
    size = -(-rows // accum)

    def optimizer_step() -> float:
        opt.step()
        opt.zero_grad(set_to_none=True)
        return 0.0

    selected = [0]

    def check_micro_batch(_batch, loss) -> None:  # TokenTune computed this micro-batch's loss
        assert torch.isfinite(loss)
        now = stack.metrics()["tokentune/selected_tokens"]
        assert now > selected[0]
        selected[0] = now

    for step in range(steps):
        selected[0] = 0
        stack.step(
            StepContext(step=step, model=model, optimizer=opt),
            [{k: v[start : start + size] for k, v in batch.items()} for start in range(0, rows, size)],
            backward=lambda loss: (loss / accum).backward(),
            optimizer_step=optimizer_step,
            on_micro_batch=check_micro_batch,
        )
    metrics = stack.metrics()
    assert 0 < metrics["tokentune/selected_frac"] < 1
    model.eval()
    with torch.no_grad():
        after = model(**batch).loss
    assert after < before, (before, after)
    return model


LORA = {
    "rank": 4,
    "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
}


@pytest.mark.parametrize(
    "names,configs,lr",
    [
        (["full", "tokentune"], {}, 3e-3),
        (["lora", "tokentune"], {"lora": LORA}, 1e-2),
        (["dora", "tokentune"], {"dora": LORA}, 1e-2),
    ],
    ids=["full", "lora", "dora"],
)
def test_trains_with_each_trainer(names, configs, lr):
    model = train(make_tiny_causal_lm("llama"), names, configs, make_batch(), lr=lr)
    if names[0] != "full":
        trainable = [n for n, p in model.named_parameters() if p.requires_grad]
        assert trainable and all("lora_" in n for n in trainable)


def test_trains_under_qlora_4bit(tmp_path):
    from transformers import BitsAndBytesConfig, LlamaForCausalLM

    make_tiny_causal_lm("llama", num_layers=1).save_pretrained(tmp_path)
    quant = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
    )
    model = LlamaForCausalLM.from_pretrained(tmp_path, quantization_config=quant)
    assert type(model.model.layers[0].mlp.up_proj).__name__ == "Linear4bit"
    configs = {"qlora": {"compute_dtype": "float32"}, "lora": LORA}
    train(model, ["qlora", "lora", "tokentune"], configs, make_batch(), steps=3)


# ---- encoders (BERT / RoBERTa sequence classification) ------------------------------------------
def make_encoder(kind="bert", dtype=torch.float64, seed=0):
    import transformers

    cfg_cls, model_cls = {
        "bert": ("BertConfig", "BertForSequenceClassification"),
        "roberta": ("RobertaConfig", "RobertaForSequenceClassification"),
    }[kind]
    cfg = getattr(transformers, cfg_cls)(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
        num_labels=3,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        pad_token_id=1,
    )
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    return getattr(transformers, model_cls)(cfg).to(dtype)


def encoder_batch(seed=0):
    batch = make_batch(seed=seed, pad_id=1)
    batch["labels"] = torch.tensor([0, 2, 1])
    return batch


@pytest.mark.parametrize("kind", ["bert", "roberta"])
def test_encoder_selected_states_and_logits_equal_stock(kind):
    model = make_encoder(kind)
    batch = encoder_batch()
    selected = draw(batch, 0.4)
    with torch.no_grad():
        stock = model(**batch)
        encoder = getattr(model, model.base_model_prefix)
        stock_hidden = encoder(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
        ).last_hidden_state
        hidden, _, valid = encoder_hidden(model, batch, selected)
        ours = tokentune_encoder_forward(model, batch, selected)
    torch.testing.assert_close(hidden[valid], stock_hidden[selected], atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(ours.logits, stock.logits, atol=1e-12, rtol=1e-10)  # [CLS] sees every token
    torch.testing.assert_close(ours.loss, stock.loss, atol=1e-12, rtol=1e-10)


def test_encoder_gradients_all_selected_and_stop_gradient():
    model = make_encoder("bert")
    batch = encoder_batch()
    # all selected == stock training
    stock_loss, stock = loss_and_grads(model, lambda: model(**batch).loss)
    loss, ours = loss_and_grads(model, lambda: tokentune_loss(model, batch, draw(batch, 1.0)))
    torch.testing.assert_close(loss, stock_loss, atol=1e-12, rtol=1e-12)
    assert_grads_close(ours, stock)

    # a subset == stop-gradient reference (R rows of embeddings, layer outputs, keys, values)
    selected = draw(batch, 0.4, seed=5)
    rest = batch["attention_mask"].bool() & ~selected

    def detach_rest(_module, _inputs, out):
        return torch.where(rest[..., None], out.detach(), out)

    bert = model.bert
    hooked = [bert.embeddings, *bert.encoder.layer]
    hooked += [
        m for layer in bert.encoder.layer for m in (layer.attention.self.key, layer.attention.self.value)
    ]
    handles = [m.register_forward_hook(detach_rest) for m in hooked]
    ref_loss, ref = loss_and_grads(model, lambda: model(**batch).loss)
    for h in handles:
        h.remove()
    loss, ours = loss_and_grads(model, lambda: tokentune_loss(model, batch, selected))
    torch.testing.assert_close(loss, ref_loss, atol=1e-12, rtol=1e-12)
    assert_grads_close(ours, ref)

    # padding: other pad token ids change nothing
    noisy = dict(batch, input_ids=batch["input_ids"].masked_fill(batch["attention_mask"] == 0, 7))
    loss2, ours2 = loss_and_grads(model, lambda: tokentune_loss(model, noisy, selected))
    torch.testing.assert_close(loss2, loss, atol=0, rtol=0)
    assert_grads_close(ours2, ours, atol=0, rtol=0)

    # the [CLS] token must be selected for the pooled path
    no_cls = selected.clone()
    no_cls[:, 0] = False
    with pytest.raises(ValueError, match="first real token"):
        tokentune_loss(model, batch, no_cls)


@pytest.mark.parametrize("trainer", ["full", "lora"])
def test_encoder_trains(trainer):
    configs = {"lora": {"rank": 4, "target_modules": ["query", "value"], "modules_to_save": ["classifier"]}}
    lr = 1e-2 if trainer == "lora" else 3e-3
    train(make_encoder("bert", dtype=torch.float32), [trainer, "tokentune"], configs, encoder_batch(), lr=lr)


# ---- selection rules ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "n,ratio,count,k",
    [
        (10, 0.3, None, 3),  # 0.3 * 10 is 3.0000000000000004 in floating point: still 3
        (11, 0.3, None, 4),  # ceil
        (100, 1.0, None, 100),
        (5, 0.1, None, 2),  # at least first + last
        (1, 0.3, None, 1),
        (0, 0.3, None, 0),
        (10, None, 4, 4),
        (3, None, 4, 3),  # never more than n
    ],
)
def test_k_rounding(n, ratio, count, k):
    assert num_selected(torch.tensor([n]), ratio, count).item() == k


def test_selection_rules():
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, 40, (64,), generator=g)
    mask = (torch.arange(40)[None] < lengths[:, None]).long()
    for ratio, count in [(0.1, None), (0.3, None), (0.77, None), (1.0, None), (None, 5)]:
        sel = select_tokens(mask, ratio, count, generator=g)
        assert sel.dtype == torch.bool and sel.shape == mask.shape
        assert torch.equal(sel.sum(1), num_selected(lengths, ratio, count))  # the documented k
        assert sel[:, 0].all() and sel[torch.arange(64), lengths - 1].all()  # first and last real token
        assert not (sel & (mask == 0)).any()  # never padding
    # same seed, same draws; successive draws differ (redrawn each call)
    a = [select_tokens(mask, 0.3, generator=torch.Generator().manual_seed(7)) for _ in range(2)]
    assert torch.equal(a[0], a[1])
    g = torch.Generator().manual_seed(7)
    assert not torch.equal(select_tokens(mask, 0.3, generator=g), select_tokens(mask, 0.3, generator=g))


def test_state_dict_round_trip_continues_draws():
    batch = make_batch()
    first = TokenTune(TokenTuneSettings(ratio=0.3, seed=11))
    model = make_tiny_causal_lm("llama").train()
    first.compute_loss(model, batch, None)  # one draw
    buf = io.BytesIO()
    torch.save(first.state_dict(), buf)
    expected = [select_tokens(batch["attention_mask"], 0.3, generator=first.generator) for _ in range(3)]
    resumed = TokenTune(TokenTuneSettings(ratio=0.3, seed=11))
    buf.seek(0)
    resumed.load_state_dict(torch.load(buf))
    resumed.prepare(model)  # prepare after loading keeps the restored generator
    got = [select_tokens(batch["attention_mask"], 0.3, generator=resumed.generator) for _ in range(3)]
    assert all(torch.equal(x, y) for x, y in zip(expected, got))


def test_settings_validation():
    with pytest.raises(ConfigError, match=r"tokentune\.ratio=1\.5 is invalid: expected a number in \(0, 1\]"):
        TokenTuneSettings(ratio=1.5)
    for bad in (0, -0.1, float("nan"), True, "0.3"):
        with pytest.raises(ConfigError, match=r"tokentune\.ratio="):
            TokenTuneSettings(ratio=bad)
    with pytest.raises(ConfigError, match=r"tokentune\.ratio=None"):
        TokenTuneSettings(ratio=None)
    with pytest.raises(ConfigError, match=r"tokentune\.count=1 is invalid"):
        TokenTuneSettings(count=1)
    assert TokenTuneSettings(count=64).ratio is None  # count takes precedence
    with pytest.raises(ConfigError, match=r"tokentune\.ratio=2"):
        RunConfig.from_dict({"methods": ["lora", "tokentune"], "tokentune": {"ratio": 2}})
    cfg = RunConfig.from_dict({"methods": ["lora", "tokentune"], "tokentune": {"ratio": 0.5, "seed": 3}})
    assert cfg.method_configs["tokentune"] == TokenTuneSettings(ratio=0.5, seed=3)
    assert REGISTRY["tokentune"] is TokenTune and TokenTune.overrides_loss and TokenTune.kind == "modifier"


def test_validate_mask_errors():
    batch = make_batch()
    with pytest.raises(ValueError, match="torch.bool"):
        validate_mask(batch["attention_mask"], batch["attention_mask"])
    with pytest.raises(ValueError, match="padding"):
        validate_mask(torch.ones(3, 14, dtype=torch.bool), batch["attention_mask"])
    with pytest.raises(ValueError, match="no token"):
        validate_mask(torch.zeros(3, 14, dtype=torch.bool), batch["attention_mask"])


def test_unsupported_architecture_is_a_clear_error():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=VOCAB, n_positions=32))
    with pytest.raises(ConfigError) as err:
        TokenTune(TokenTuneSettings()).prepare(model)
    assert "GPT2LMHeadModel" in str(err.value) and all(name in str(err.value) for name in SUPPORTED)


# ---- select: labelled (our extension) ------------------------------------------------------------
def sft_batch(rows=64, length=40, seed=0, left_pad=False):
    """Random lengths and prompt lengths; labels -100 on the prompt and padding (short answers)."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, length + 1, (rows,), generator=g)
    answers = torch.minimum(torch.randint(0, 6, (rows,), generator=g), lengths)
    pos = torch.arange(length)[None]
    if left_pad:
        start = length - lengths[:, None]
        mask, answer = pos >= start, pos >= length - answers[:, None]
    else:
        mask, answer = (
            pos < lengths[:, None],
            (pos < lengths[:, None]) & (pos >= (lengths - answers)[:, None]),
        )
    ids = torch.randint(3, VOCAB, (rows, length), generator=g).masked_fill(~mask, 0)
    labels = ids.masked_fill(~answer, -100)
    return {"input_ids": ids, "attention_mask": mask.long(), "labels": labels}


@pytest.mark.parametrize("left_pad", [False, True], ids=["right_pad", "left_pad"])
def test_labelled_selection_rules(left_pad):
    batch = sft_batch(left_pad=left_pad)
    mask, labels = batch["attention_mask"], batch["labels"]
    real = mask.bool()
    sup = supervised_positions(labels, mask)
    # a position predicts a supervised label when its next token is real and labelled (shifted)
    assert torch.equal(sup[:, :-1], real[:, :-1] & real[:, 1:] & (labels[:, 1:] != -100))
    assert not sup[:, -1].any()
    rows = torch.arange(mask.shape[0])
    first = real.long().argmax(1)
    last = mask.shape[1] - 1 - real.flip(1).long().argmax(1)
    g = torch.Generator().manual_seed(0)
    for ratio, count in [(0.1, None), (0.3, None), (0.77, None), (1.0, None), (None, 2), (None, 5)]:
        sel = select_labelled(mask, labels, ratio, count, generator=g)
        assert sel.dtype == torch.bool and sel.shape == mask.shape
        assert torch.equal(sel.sum(1), num_selected(real.sum(1), ratio, count))  # same k as uniform
        assert sel[rows, first].all() and sel[rows, last].all()  # first and last real token forced
        assert not (sel & ~real).any()  # never padding
        forced = torch.zeros_like(real)
        forced[rows, first] = forced[rows, last] = True
        free = sel.sum(1) - forced.sum(1)  # slots left after first/last
        sup_free = sup & ~forced
        # priority: supervised positions fill the free slots first, all of them when they fit
        assert torch.equal((sel & sup_free).sum(1), torch.minimum(free, sup_free.sum(1)))
        others_taken = (sel & real & ~sup & ~forced).any(1)
        assert not (others_taken & (sup_free & ~sel).any(1)).any()
    # every supervised position gets selected when the answer fits into k
    fits = select_labelled(mask, labels, count=8, generator=g)
    assert not (sup & ~fits)[sup.sum(1) <= 6].any()


def test_labelled_draws_uniformly_within_each_tier():
    """More supervised positions than free slots: each is drawn about equally often; same for the rest."""
    ids = torch.arange(3, 23)[None]
    labels = torch.full_like(ids, -100)
    labels[0, 11:] = ids[0, 11:]  # positions 10..18 predict a label (9 of them), 1..9 do not
    mask = torch.ones_like(ids)
    g = torch.Generator().manual_seed(0)
    hits = sum(select_labelled(mask, labels, count=6, generator=g).long() for _ in range(2000))[0]
    assert hits[0] == hits[19] == 2000 and hits[1:10].sum() == 0  # 4 free slots < 9 supervised
    assert hits[10:19].sum() == 4 * 2000
    assert (hits[10:19] - 2000 * 4 / 9).abs().max() < 120
    hits = sum(select_labelled(mask, labels, count=14, generator=g).long() for _ in range(2000))[0]
    assert (hits[10:19] == 2000).all() and hits[1:10].sum() == 3 * 2000  # 12 free: 9 + 3 uniform rest
    assert (hits[1:10] - 2000 * 3 / 9).abs().max() < 120


def test_labelled_is_deterministic_from_the_seed():
    batch = sft_batch()
    mask, labels = batch["attention_mask"], batch["labels"]
    a = [select_labelled(mask, labels, 0.3, generator=torch.Generator().manual_seed(7)) for _ in range(2)]
    assert torch.equal(a[0], a[1])
    g = torch.Generator().manual_seed(7)
    assert not torch.equal(
        select_labelled(mask, labels, 0.3, generator=g), select_labelled(mask, labels, 0.3, generator=g)
    )
    # the same generator consumption as the uniform rule (B * L uniforms per call)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    select_labelled(mask, labels, 0.3, generator=g1)
    select_tokens(mask, 0.3, generator=g2)
    assert torch.equal(g1.get_state(), g2.get_state())
    # no supervised position: exactly the uniform rule's draw
    none = torch.full_like(labels, -100)
    torch.testing.assert_close(
        select_labelled(mask, none, 0.3, generator=torch.Generator().manual_seed(5)),
        select_tokens(mask, 0.3, generator=torch.Generator().manual_seed(5)),
    )


def test_labelled_checkpoint_round_trip_and_metrics():
    batch = make_batch(prompt=11)  # short answers: 3 of 14 tokens labelled, none in the others
    model = make_tiny_causal_lm("llama").train()
    cfg = TokenTuneSettings(ratio=0.3, seed=11, select="labelled")
    first = TokenTune(cfg)
    first.prepare(model)
    first.on_step_start(None)
    loss = first.compute_loss(model, batch, None)
    assert torch.isfinite(loss)
    metrics = first.metrics()
    assert metrics["tokentune/label_coverage"] == 1.0  # every supervised position fits into k
    assert metrics["tokentune/selected_tokens"] == int(num_selected(torch.tensor(LENGTHS), 0.3).sum())
    buf = io.BytesIO()
    torch.save(first.state_dict(), buf)
    mask, labels = batch["attention_mask"], batch["labels"]
    expected = [select_labelled(mask, labels, 0.3, generator=first.generator) for _ in range(3)]
    resumed = TokenTune(TokenTuneSettings(ratio=0.3, seed=11, select="labelled"))
    buf.seek(0)
    resumed.load_state_dict(torch.load(buf))
    resumed.prepare(model)
    got = [select_labelled(mask, labels, 0.3, generator=resumed.generator) for _ in range(3)]
    assert all(torch.equal(x, y) for x, y in zip(expected, got))
    # the uniform rule reports coverage too (here: less than all supervised positions, on average)
    uniform = TokenTune(TokenTuneSettings(ratio=0.3, seed=11))
    covered = []
    for _ in range(20):
        uniform.on_step_start(None)
        uniform.compute_loss(model, batch, None)
        covered.append(uniform.metrics()["tokentune/label_coverage"])
    assert all(0 <= c <= 1 for c in covered) and sum(covered) / len(covered) < 1


def test_labelled_trains_and_is_searchable():
    configs = {"lora": LORA, "tokentune": {"ratio": 0.3, "select": "labelled"}}
    train(make_tiny_causal_lm("llama"), ["lora", "tokentune"], configs, make_batch(prompt=11))
    from orchestrator.spec.parts import SpecError
    from orchestrator.spec.sweep import parse_spec
    from orchestrator.spec.validate import validate_spec

    base = {"methods": ["lora", "tokentune"]}
    spec = parse_spec(
        {"name": "sel", "base": base, "search": {"tokentune.select": {"grid": ["uniform", "labelled"]}}}
    )
    assert [c.method_configs["tokentune"].select for c in spec.trial_configs()] == ["uniform", "labelled"]
    validate_spec(spec, check_inputs=False)
    typo = parse_spec({"name": "sel", "base": base, "search": {"tokentune.select": {"grid": ["labeled"]}}})
    with pytest.raises(SpecError, match=r"search\.tokentune\.select: value 'labeled' is not accepted"):
        validate_spec(typo, check_inputs=False)


def test_labelled_settings_and_encoder_errors():
    assert TokenTuneSettings().select == "uniform"
    with pytest.raises(
        ConfigError, match=r"tokentune\.select='random' is invalid: expected one of uniform, labelled"
    ):
        TokenTuneSettings(select="random")
    with pytest.raises(ConfigError, match=r"tokentune\.select"):
        RunConfig.from_dict({"methods": ["lora", "tokentune"], "tokentune": {"select": "labeled"}})
    method = TokenTune(TokenTuneSettings(select="labelled"))
    with pytest.raises(ConfigError, match=r"tokentune\.select='labelled' needs per-token labels"):
        method.prepare(make_encoder("bert"))
    TokenTune(TokenTuneSettings(select="uniform")).prepare(make_encoder("bert"))  # the paper's rule works
