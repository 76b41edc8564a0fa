"""Hugging Face interop: import-hf / export-hf, logits and gradients equal to transformers', the tokenizer equal to
BertTokenizerFast, and clear errors for folders that cannot be converted.

The comparisons need the `interop` extra (torch CPU, transformers); where it is missing they skip with that reason,
and the tests of the file handling alone still run. Models are random-initialised from `transformers.ElectraConfig`
at tiny sizes, with every tensor redrawn at a larger scale (and LayerNorm gains and biases away from 1 and 0) so the
logits are O(1) rather than O(0.01) and a 1e-5 agreement means something. Dropout is off (eval mode) throughout.

Tolerances: float32 logits within 1e-5 absolute; float32 gradients of every parameter within 1e-4 absolute (the
largest gradient entries here are O(1)); float64 runs of the same comparisons within 1e-10.
"""

import json
import random
import re

import numpy as np
import pytest

from minielectra import checkpoint as ckpt
from minielectra import classifier as clf
from minielectra import cli, config as cfgmod, detect, electra, hf
from minielectra.backend import set_backend
from minielectra.nn import zeros_like
from minielectra.nn.encoder import electra_encoder_backward, electra_encoder_forward
from minielectra.nn.heads import (discriminator_head_backward, discriminator_head_forward, generator_head_backward,
                                  generator_head_forward)
from minielectra.optim import adamw_init
from minielectra.ops.losses import sigmoid_cross_entropy, softmax_cross_entropy
from minielectra.tokenizer import train_wordpiece

NEEDS = "needs the interop extra: pip install -e '.[interop]' (torch CPU, transformers)"

# (embedding_size, hidden_size, layers, heads, ffn, max_positions, type_vocab_size): E != C with a projection either
# way, E == C without one, one and several heads and layers.
CONFIGS = {
    "E8-C16-L2-H2": (8, 16, 2, 2, 32, 40, 2),
    "E12-C12-L1-H3": (12, 12, 1, 3, 24, 40, 2),
    "E16-C8-L3-H1": (16, 8, 3, 1, 20, 48, 3),
}
LENGTHS = (1, 7, 33)  # T: a lone [CLS], short, and longer than a power of two
PADDINGS = ("none", "ragged")  # every row full; rows of different lengths, right-padded

WORDS = ("the chef cooked a meal and we ate it slowly in the old kitchen while rain fell outside playing quietly "
         "unaffable running jumped happiest").split()


@pytest.fixture(autouse=True)
def numpy_backend():
    """The NumPy reference: the comparisons are of the definition, not of a kernel (kernels have their own tests)."""
    set_backend("numpy")
    yield
    set_backend("auto")


@pytest.fixture(scope="module")
def torch():
    torch = pytest.importorskip("torch", reason=NEEDS)
    pytest.importorskip("transformers", reason=NEEDS)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: threads only contend with NumPy's BLAS for the same cores
    yield torch
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def transformers(torch):
    import transformers

    return transformers


def make_vocab(path):
    tok = train_wordpiece([" ".join(WORDS)] * 2, 120, min_frequency=1)
    tok.save(path)
    return tok


def hf_config(transformers, name, vocab_size, **extra):
    E, C, L, H, F, P, types = CONFIGS[name]
    return transformers.ElectraConfig(vocab_size=vocab_size, embedding_size=E, hidden_size=C, num_hidden_layers=L,
                                      num_attention_heads=H, intermediate_size=F, max_position_embeddings=P,
                                      type_vocab_size=types, hidden_act="gelu", **extra)


def randomise(torch, model, seed):
    """Every tensor redrawn: weights N(0, 0.2^2), biases N(0, 0.1^2), LayerNorm gains 1 + N(0, 0.2^2)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g, dtype=p.dtype)
            if "LayerNorm.weight" in name:
                p.copy_(1 + 0.2 * noise)
            elif name.endswith("bias"):
                p.copy_(0.1 * noise)
            else:
                p.copy_(0.2 * noise)
    return model.eval()


def save_hf(torch, transformers, arch, name, folder, seed=0, **extra):
    """A random transformers model of `arch` saved to folder with a vocab.txt: a stand-in for a download."""
    folder.mkdir(parents=True, exist_ok=True)
    tok = make_vocab(folder / "vocab.txt")
    model = randomise(torch, getattr(transformers, arch)(hf_config(transformers, name, tok.vocab_size, **extra)), seed)
    model.save_pretrained(folder)
    return model, tok


def make_batch(config, T, padding, seed):
    """(input_ids, attention_mask, token_type_ids) of 3 rows: [CLS] words, pads after each row's length."""
    rng = np.random.default_rng(seed)
    B = 3
    lengths = [T] * B if padding == "none" else [T, max(1, T // 2), max(1, T - 3)]
    ids = rng.integers(5, config.vocab_size, size=(B, T))
    ids[:, 0] = config.cls_token_id
    mask = (np.arange(T)[None, :] < np.array(lengths)[:, None]).astype(np.int64)
    ids = np.where(mask > 0, ids, config.pad_token_id)
    types = rng.integers(0, config.type_vocab_size, size=(B, T)) * mask
    return ids, mask, types


def hf_grads(model, table):
    """{our name: gradient as we store it} from a transformers model after backward()."""
    named = dict(model.named_parameters())
    return {ours: (named[name].grad.T if t else named[name].grad).numpy()
            for name, (ours, _, t) in table.items()}


def max_grad_diff(ours, theirs):
    return max(float(np.max(np.abs(ours[k] - theirs[k]))) for k in theirs)


# ---- the three architectures, measured ------------------------------------------------------------------------------


def imported(torch, transformers, tmp_path, arch, name, **extra):
    """(transformers model, our params, config, labels): a random `arch` saved, then read back with import_hf."""
    model, _ = save_hf(torch, transformers, arch, name, tmp_path / "hf", **extra)
    hf.import_hf(tmp_path / "hf", tmp_path / "ours")
    params, config, _, labels = hf.load_folder(tmp_path / "ours")
    return model, params, config, labels


def measure_discriminator(torch, model, params, config, T, padding, dtype=np.float32):
    """(max |logit diff|, max |grad diff|) of a random ElectraForPreTraining against minielectra, RTD loss."""
    params = {k: a.astype(dtype) for k, a in params.items()}
    ids, mask, types = make_batch(config, T, padding, seed=T)
    labels = np.random.default_rng(1).integers(0, 2, size=ids.shape)

    h, enc = electra_encoder_forward(params, f"{electra.DISC}.electra", electra.EMB, ids, types, mask,
                                     electra.encoder_dims(config, electra.DISC))
    logits, head = discriminator_head_forward(params, electra.DISC, h)
    _, dlogits = sigmoid_cross_entropy(logits, labels.astype(dtype), mask.astype(dtype))
    grads = zeros_like(params)
    dh = discriminator_head_backward(dlogits, head, grads, electra.DISC)
    electra_encoder_backward(dh, enc, grads, f"{electra.DISC}.electra", electra.EMB)

    if dtype == np.float64:
        model = model.double()
    out = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                token_type_ids=torch.from_numpy(types))
    real = torch.from_numpy(mask).bool()
    loss = torch.nn.functional.binary_cross_entropy_with_logits(out.logits[real], torch.from_numpy(labels)[real].to(
        out.logits.dtype))
    loss.backward()
    theirs = hf_grads(model, hf.name_map(hf.DISC, config))
    return float(np.max(np.abs(logits - out.logits.detach().numpy()))), max_grad_diff(grads, theirs)


def measure_generator(torch, model, params, config, T, padding, dtype=np.float32):
    """(max |logit diff|, max |grad diff|) of a random ElectraForMaskedLM against minielectra, MLM loss."""
    params = {k: a.astype(dtype) for k, a in params.items()}
    ids, mask, types = make_batch(config, T, padding, seed=T)
    B = ids.shape[0]
    targets = np.random.default_rng(2).integers(0, config.vocab_size, size=ids.shape)
    picked = np.flatnonzero(mask.reshape(-1))[::2]  # every other real position is "masked"

    h, enc = electra_encoder_forward(params, f"{electra.GEN}.electra", electra.EMB, ids, types, mask,
                                     electra.encoder_dims(config, electra.GEN))
    flat = h.reshape(B * T, -1)
    logits, _ = generator_head_forward(params, electra.GEN, electra.WORDS, flat, config.layer_norm_eps)  # every row
    sel, head = generator_head_forward(params, electra.GEN, electra.WORDS, flat[picked], config.layer_norm_eps)
    _, dsel = softmax_cross_entropy(sel, targets.reshape(-1)[picked])
    grads = zeros_like(params)
    dflat = np.zeros_like(flat)
    dflat[picked] = generator_head_backward(dsel, head, grads, electra.GEN, electra.WORDS)
    electra_encoder_backward(dflat.reshape(h.shape), enc, grads, f"{electra.GEN}.electra", electra.EMB)

    if dtype == np.float64:
        model = model.double()
    hf_labels = np.full(ids.shape, -100)
    hf_labels.reshape(-1)[picked] = targets.reshape(-1)[picked]
    out = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                token_type_ids=torch.from_numpy(types), labels=torch.from_numpy(hf_labels))
    out.loss.backward()
    theirs = hf_grads(model, hf.name_map(hf.GEN, config))
    diff = np.abs(logits.reshape(B, T, -1) - out.logits.detach().numpy())
    return float(np.max(diff)), max_grad_diff(grads, theirs)


def measure_classifier(torch, model, params, config, T, padding, dtype=np.float32):
    """(max |logit diff|, max |grad diff|) of a random ElectraForSequenceClassification (3 labels), CE loss."""
    params = {k: a.astype(dtype) for k, a in params.items()}
    ids, mask, types = make_batch(config, T, padding, seed=T)
    y = np.array([0, 2, 1])
    loss, logits, cache = clf.forward(params, (ids, mask, types, y), config, 3)
    grads = clf.backward(params, cache)

    if dtype == np.float64:
        model = model.double()
    out = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                token_type_ids=torch.from_numpy(types), labels=torch.from_numpy(y))
    out.loss.backward()
    theirs = hf_grads(model, hf.name_map(hf.CLASSIFIER, config, 3))
    return float(np.max(np.abs(logits - out.logits.detach().numpy()))), max_grad_diff(grads, theirs)


# part -> (architecture, extra config, the measure); the classifier has 3 labels, named.
MEASURES = {"discriminator": ("ElectraForPreTraining", {}, measure_discriminator),
            "generator": ("ElectraForMaskedLM", {}, measure_generator),
            "classifier": ("ElectraForSequenceClassification", {"id2label": {0: "neg", 1: "neutral", 2: "pos"}},
                           measure_classifier)}
CASES = [(T, p) for T in LENGTHS for p in PADDINGS if not (T == 1 and p == "ragged")]


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("part", MEASURES)
def test_logits_and_gradients_match_transformers(torch, transformers, tmp_path, part, name):
    arch, extra, measure = MEASURES[part]
    model, params, config, labels = imported(torch, transformers, tmp_path, arch, name, **extra)
    assert labels == (["neg", "neutral", "pos"] if part == "classifier" else None)
    for T, padding in CASES:
        model.zero_grad()
        logit_diff, grad_diff = measure(torch, model, params, config, T, padding)
        assert logit_diff < 1e-5, (part, name, T, padding, logit_diff)
        assert grad_diff < 1e-4, (part, name, T, padding, grad_diff)


@pytest.mark.parametrize("part", MEASURES)
def test_float64_agrees_to_rounding(torch, transformers, tmp_path, part):
    arch, extra, measure = MEASURES[part]
    model, params, config, _ = imported(torch, transformers, tmp_path, arch, "E8-C16-L2-H2", **extra)
    logit_diff, grad_diff = measure(torch, model, params, config, 7, "ragged", np.float64)
    assert logit_diff < 1e-10 and grad_diff < 1e-10


# ---- round trips and exports transformers loads cleanly -------------------------------------------------------------


ARCHS = ("ElectraForPreTraining", "ElectraForMaskedLM", "ElectraForSequenceClassification")


def same_folder(a, b):
    """The two minielectra folders hold bit-identical params, the same config and vocab (and labels)."""
    pa, ca, va, la = hf.load_folder(a)
    pb, cb, vb, lb = hf.load_folder(b)
    assert set(pa) == set(pb)
    for k in pa:
        assert pa[k].dtype == pb[k].dtype == np.float32 and pa[k].tobytes() == pb[k].tobytes(), k
    assert (ca, va, la) == (cb, vb, lb)


@pytest.mark.parametrize("arch", ARCHS)
def test_import_export_import_is_bit_identical_and_loads_without_warnings(torch, transformers, tmp_path, arch):
    original, _ = save_hf(torch, transformers, arch, "E8-C16-L2-H2", tmp_path / "hf")
    hf.import_hf(tmp_path / "hf", tmp_path / "a")
    hf.export_hf(tmp_path / "a", tmp_path / "hf2")
    hf.import_hf(tmp_path / "hf2", tmp_path / "b")
    same_folder(tmp_path / "a", tmp_path / "b")
    before = hf.read_safetensors(tmp_path / "hf" / hf.WEIGHTS)
    after = hf.read_safetensors(tmp_path / "hf2" / hf.WEIGHTS)
    assert set(after) == set(before) - {hf.TIED_LM_HEAD}
    assert all(before[k].tobytes() == after[k].tobytes() for k in after)

    loaded, info = getattr(transformers, arch).from_pretrained(tmp_path / "hf2", output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched weights
    ids = torch.tensor([[2, 9, 17, 30, 3]])
    # The weights are bit-identical (above); the two models may still pick different float32 kernels.
    assert torch.allclose(loaded.eval()(input_ids=ids).logits, original(input_ids=ids).logits, rtol=0, atol=1e-6)


def write_pretraining_run(folder, config, params, objective=None):
    tok = make_vocab(folder / "vocab.txt")
    assert tok.vocab_size == config.vocab_size
    tc = cfgmod.TrainConfig(seq_len=16) if objective is None else cfgmod.TrainConfig(seq_len=16, objective=objective)
    ckpt.save_checkpoint(folder / hf.RUN_CHECKPOINT, params, adamw_init(params), 5, cfgmod.to_json(config, tc), np.random.default_rng(0), vocab=tok.vocab,
                         extra={"batches": {}})


def test_a_pretraining_run_exports_both_halves_and_an_mlm_run_its_masked_lm(torch, transformers, tmp_path):
    vocab = make_vocab(tmp_path / "vocab.txt")
    config = cfgmod.ElectraConfig(vocab_size=vocab.vocab_size, embedding_size=8, hidden_size=16, num_hidden_layers=2,
                                  num_attention_heads=2, intermediate_size=32, generator_hidden_size=8,
                                  generator_num_attention_heads=1, generator_intermediate_size=16,
                                  max_position_embeddings=32, initializer_range=0.3)
    from minielectra import mlm

    runs = {"electra": electra.init_model(config, np.random.default_rng(0)),
            "mlm": mlm.init_model(config, np.random.default_rng(1))}
    ids = np.array([[2, 9, 17, 30, 3, 0]])
    mask = (ids != 0).astype(np.int64)
    for objective, params in runs.items():
        (tmp_path / objective).mkdir()
        write_pretraining_run(tmp_path / objective, config, params, objective)
    parts = {"discriminator": ("electra", "ElectraForPreTraining", electra.DISC),
             "generator": ("electra", "ElectraForMaskedLM", electra.GEN),
             "mlm": ("mlm", "ElectraForMaskedLM", mlm.HEAD)}
    for part, (objective, arch, prefix) in parts.items():
        out = tmp_path / f"hf-{part}"
        summary = hf.export_hf(tmp_path / objective, out, part=part if part != "discriminator" else None)
        assert summary["architecture"] == arch and summary["part"] == part
        model, info = getattr(transformers, arch).from_pretrained(out, output_loading_info=True)
        assert not any(info.values()), info
        theirs = model.eval()(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).logits
        params = runs[objective]
        which = electra.GEN if part == "generator" else electra.DISC
        h, _ = electra_encoder_forward(params, f"{which}.electra", electra.EMB, ids, np.zeros_like(ids), mask,
                                       electra.encoder_dims(config, which))
        if part == "discriminator":
            ours = discriminator_head_forward(params, prefix, h)[0]
        else:
            ours = generator_head_forward(params, prefix, electra.WORDS, h[0], config.layer_norm_eps)[0][None]
        assert np.max(np.abs(ours - theirs.detach().numpy())) < 1e-5, part


# ---- detect -------------------------------------------------------------------------------------------------------


def test_detect_logits_equal_transformers_on_the_same_text(torch, transformers, tmp_path, capsys):
    model, _ = save_hf(torch, transformers, "ElectraForPreTraining", "E8-C16-L2-H2", tmp_path / "hf")
    hf.import_hf(tmp_path / "hf", tmp_path / "run")
    text = "The chef DRANK the meal, slowly!"
    hf_tok = transformers.BertTokenizerFast.from_pretrained(tmp_path / "hf")
    ids = hf_tok(text, return_tensors="pt")["input_ids"]
    theirs = model(input_ids=ids).logits[0].detach().numpy()

    (d,) = detect.detect(tmp_path / "run", [text])
    assert d.ids == ids[0].tolist()
    assert np.max(np.abs(np.array(d.logits) - theirs)) < 1e-5
    assert cli.main(["detect", "--model", str(tmp_path / "run"), "--json", text, "--backend", "numpy"]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["ids"] == d.ids and printed["tokens"][0] == "[CLS]"
    assert np.max(np.abs(np.array(printed["logits"]) - theirs)) < 1e-5


def test_an_imported_discriminator_fine_tunes_and_refuses_to_resume(torch, transformers, tmp_path):
    save_hf(torch, transformers, "ElectraForPreTraining", "E8-C16-L2-H2", tmp_path / "hf")
    hf.import_hf(tmp_path / "hf", tmp_path / "run")
    from minielectra import finetune

    params, config, vocab = finetune.load_pretrained(tmp_path / "run")
    new = clf.init_classifier(config, 2, np.random.default_rng(0), init_params=params)
    assert all(np.array_equal(new[k], params[k]) for k in new if not k.startswith("classifier."))
    from minielectra.train import pretrain

    with pytest.raises(ckpt.CheckpointError, match="not a pre-training run's checkpoint.*ElectraForPreTraining"):
        pretrain(tmp_path / "run", resume=True)


def test_an_imported_classifier_predicts_like_transformers(torch, transformers, tmp_path):
    model, _ = save_hf(torch, transformers, "ElectraForSequenceClassification", "E12-C12-L1-H3", tmp_path / "hf",
                       id2label={0: "NEGATIVE", 1: "POSITIVE"})
    hf.import_hf(tmp_path / "hf", tmp_path / "model")
    from minielectra import finetune

    text = "we ate the meal slowly"
    (label, prob, probs), = finetune.predict(tmp_path / "model", [text])
    hf_tok = transformers.BertTokenizerFast.from_pretrained(tmp_path / "hf")
    theirs = torch.softmax(model(**hf_tok(text, return_tensors="pt")).logits, -1)[0].detach().numpy()
    assert np.max(np.abs(np.array(probs) - theirs)) < 1e-5
    assert label == ["NEGATIVE", "POSITIVE"][int(theirs.argmax())]


# ---- the tokenizer against BertTokenizerFast ------------------------------------------------------------------------


PIECES = {
    "words": WORDS + ["Straße", "naïve", "Café", "résumé", "ÉCOLE", "Ångström", "façade", "Zürich", "ΟΔΟΣ", "İstanbul",
                      "ǅemal", "ﬁne", "Москва", "한국어", "ＦＵＬＬ", "x²", "½", "ß", "ĳssel", "Ω"],
    "punctuation": list(",.;:!?-—–…'\"()[]{}«»¿¡/@#$%^&*+=<>|~`\\_·‘’“”"),
    "digits": ["2020", "3.14", "1,000", "42nd", "007", "٣", "१२"],
    "cjk": ["北京", "東京", "中文字", "漢", "ひらがな", "カタカナ"],
    "emoji": ["😀", "👍🏽", "🎉", "❤️", "👨‍👩‍👧", "🇫🇷"],
    "space": [" ", "  ", "\t", "\n", "\u00a0", "\u2028", "\u3000", "\u200b", "\u00ad"],
}


def random_case(rng, word):
    kind = rng.random()
    if kind < 0.5:
        return word
    if kind < 0.7:
        return word.upper()
    if kind < 0.85:
        return word.title()
    return "".join(ch.upper() if rng.random() < 0.5 else ch for ch in word)


def sentences(n, seed=0):
    """n sentences mixing every class of PIECES, plus very long words (over 100 chars: [UNK] whole)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        parts = []
        for _ in range(rng.randint(1, 14)):
            kind = rng.choice(list(PIECES))
            piece = rng.choice(PIECES[kind])
            if kind == "words":
                piece = random_case(rng, piece)
                if rng.random() < 0.06:
                    piece = piece * rng.randint(10, 40)  # "thethethe...": over 100 chars, or long and splittable
            parts.append(piece)
            parts.append(rng.choice(["", " ", " ", " "]))
        out.append("".join(parts))
    return out


def test_tokenizer_gives_bert_tokenizer_fast_ids(transformers, tmp_path):
    texts = sentences(3000)
    # A vocab trained on half the sentences: the other half has words it can only split, or not at all ([UNK]).
    tok = train_wordpiece(texts[::2], 400, min_frequency=2)
    tok.save(tmp_path / "vocab.txt")
    fast = transformers.BertTokenizerFast.from_pretrained(tmp_path)  # uncased: do_lower_case is its default
    theirs = fast(texts, add_special_tokens=False)["input_ids"]
    mismatches = [(t, tok.tokenize(t), fast.convert_ids_to_tokens(ids)) for t, ids in zip(texts, theirs)
                  if tok.encode(t) != ids]
    assert not mismatches, f"{len(mismatches)} of {len(texts)} differ, e.g. {mismatches[:3]}"
    assert sum(tok.unk_id in tok.encode(t) for t in texts) > 50  # the [UNK] fallback was exercised


# ---- errors a user can fix, in one line --------------------------------------------------------------------------


def test_a_pickle_is_refused_with_the_conversion_command(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["ElectraForPreTraining"]}))
    (tmp_path / "vocab.txt").write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\na\n")
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    assert cli.main(["import-hf", str(tmp_path), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "pickle" in err and "safetensors" in err and "save_file" in err
    with pytest.raises(hf.HFError, match="pickle"):
        hf.import_hf(tmp_path / "pytorch_model.bin", tmp_path / "run")
    assert not (tmp_path / "run").exists()


def small_pretraining_run(tmp_path):
    """A pre-training run folder tmp_path/run of a one-layer model with random weights (no torch needed)."""
    tok = make_vocab(tmp_path / "vocab.txt")
    config = cfgmod.ElectraConfig(vocab_size=tok.vocab_size, embedding_size=8, hidden_size=16, num_hidden_layers=1,
                                  num_attention_heads=2, intermediate_size=32, generator_hidden_size=8,
                                  generator_num_attention_heads=1, generator_intermediate_size=16,
                                  max_position_embeddings=16)
    (tmp_path / "run").mkdir()
    write_pretraining_run(tmp_path / "run", config, electra.init_model(config, np.random.default_rng(0)))


@pytest.mark.parametrize("problem, message", [
    ("no config", "no config.json"),
    ("no vocab", "no vocab.txt"),
    ("no weights", "has no model.safetensors"),
    ("token classification", "ElectraForTokenClassification"),
    ("tanh gelu", "hidden_act is 'gelu_new'"),
    ("wrong vocab", "vocab.txt has"),
    ("missing tensor", "missing 1 tensor"),
    ("extra tensor", "unexpected 1 tensor"),
    ("wrong shape", "shapes do not match"),
])
def test_bad_folders_are_one_line_errors(tmp_path, capsys, problem, message):
    """Each folder is a valid one from export_hf, then broken in one way (no torch needed)."""
    small_pretraining_run(tmp_path)
    folder = tmp_path / "hf"
    hf.export_hf(tmp_path / "run", folder)
    cfg = json.loads((folder / "config.json").read_text())
    weights = hf.read_safetensors(folder / hf.WEIGHTS)
    if problem == "no config":
        (folder / "config.json").unlink()
    elif problem == "no vocab":
        (folder / "vocab.txt").unlink()
    elif problem == "no weights":
        (folder / hf.WEIGHTS).unlink()
    elif problem == "token classification":
        cfg["architectures"] = ["ElectraForTokenClassification"]
    elif problem == "tanh gelu":
        cfg["hidden_act"] = "gelu_new"
    elif problem == "wrong vocab":
        cfg["vocab_size"] += 1
    elif problem == "missing tensor":
        del weights["discriminator_predictions.dense.bias"]
    elif problem == "extra tensor":
        weights["discriminator_predictions.extra.bias"] = np.zeros(3, np.float32)
    elif problem == "wrong shape":
        weights["electra.encoder.layer.0.intermediate.dense.weight"] = np.zeros((31, 16), np.float32)
    if problem in ("token classification", "tanh gelu", "wrong vocab"):
        (folder / "config.json").write_text(json.dumps(cfg))
    if problem in ("missing tensor", "extra tensor", "wrong shape"):
        import safetensors.numpy

        safetensors.numpy.save_file(weights, str(folder / hf.WEIGHTS), metadata={"format": "pt"})
    assert cli.main(["import-hf", str(folder), "--out", str(tmp_path / "imported")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and message in err, err


def test_export_and_detect_refuse_what_they_cannot_use(tmp_path, capsys):
    small_pretraining_run(tmp_path)
    hf.export_hf(tmp_path / "run", tmp_path / "gen", part="generator")
    hf.import_hf(tmp_path / "gen", tmp_path / "gen-run")
    assert cli.main(["detect", "--model", str(tmp_path / "gen-run"), "text"]) == 2
    assert "has no discriminator" in capsys.readouterr().err
    assert cli.main(["export-hf", str(tmp_path / "gen-run"), "--out", str(tmp_path / "x"), "--part",
                     "discriminator"]) == 2
    assert "has no discriminator to export (it holds: generator)" in capsys.readouterr().err
    assert cli.main(["export-hf", str(tmp_path / "run"), "--out", str(tmp_path / "gen")]) == 2
    assert re.search(r"gen/model.safetensors exists", capsys.readouterr().err)
    assert cli.main(["export-hf", str(tmp_path / "nothing"), "--out", str(tmp_path / "y")]) == 2
    assert "holds neither" in capsys.readouterr().err


def test_bfloat16_and_float16_weights_are_widened_exactly(tmp_path):
    import safetensors.numpy

    x = np.array([1.0, -2.5, 3.140625, 0.0078125], dtype=np.float32)
    bf16 = (x.view(np.uint32) >> 16).astype(np.uint16)
    safetensors.numpy.save_file({"a": x.astype(np.float16)}, str(tmp_path / "h.safetensors"))
    path = tmp_path / "b.safetensors"
    safetensors.numpy.save_file({"a": bf16}, str(path))
    raw = path.read_bytes()  # relabel the uint16 tensor as BF16 (NumPy cannot write bfloat16)
    n = int.from_bytes(raw[:8], "little")
    header = raw[8:8 + n].replace(b'"U16"', b'"BF16"')
    path.write_bytes(len(header).to_bytes(8, "little") + header + raw[8 + n:])
    for name in ("h.safetensors", "b.safetensors"):
        a = hf.read_safetensors(tmp_path / name)["a"]
        assert a.dtype == np.float32 and np.array_equal(a, x), name
