"""picochat export / import: transformers loads an export offline and computes what picochat
computes; the tokenizer and chat template give picochat's tokens; export -> import and nanochat's
own checkpoint format come back bit for bit; broken inputs are refused in one line."""
import copy
import json
import os
import pickle
import shlex
import shutil
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything here is local; never reach for the Hub
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
import tiktoken
import torch

from picochat.common import PicochatError
from stagerun import picochat

# Measured 2.4e-6 (fp32, d2 model, 120-250 token prompts): the two differ only in how the RMS
# is reduced. 1e-4 leaves room for other CPUs' kernels while catching any real mapping error.
LOGITS_ATOL = 1e-4

TRAIN = ["--recipe", "seed", "--dataset", "tiny", "--depth", "2", "--max-seq-len", "256",
         "--device-batch-size", "4", "--total-batch-size", "1024", "--dtype", "float32", "--device", "cpu",
         "--eval-every", "-1", "--sample-every", "-1", "--num-iterations", "40", "--model-tag", "exporttest"]

SAMPLES = [
    "Hello world! 🎉😀👍🏽 naïve café, «quotes» — dash",
    "你好，世界。日本語のテキストも。한국어 문장",
    "digits 0 12 345 6789 3.14159 1,000,000 and 2026-07-01",
    "whitespace   runs\t\ttabs\n\n\nnewlines  \r\n  trailing   ",
    "The king's lord'll say: WHAT shall we do now?",
]
SPECIAL_SAMPLE = "<|bos|>text<|user_start|> and <|python_start|>1+1<|python_end|>"

CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Hi  there 🎉"}],
    [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "Hi! How can I help?"},
     {"role": "user", "content": "What is 12*7?"}],
    [{"role": "system", "content": "You can use a calculator."}, {"role": "user", "content": "12*7?"},
     {"role": "assistant", "content": [{"type": "text", "text": "Let me compute: "},
                                       {"type": "python", "text": "12*7"},
                                       {"type": "python_output", "text": "84"},
                                       {"type": "text", "text": " So it is 84."}]},
     {"role": "user", "content": "thanks"}],
    [{"role": "user", "content": "ends with a reply"}, {"role": "assistant", "content": "dropped for completion"}],
]


@pytest.fixture(scope="module")
def exported(tiny_home, tmp_path_factory):
    """A base model trained for a few steps, exported with the CLI. Returns (home, folder)."""
    picochat(tiny_home, "base_train", *TRAIN)
    out = tmp_path_factory.mktemp("export") / "exporttest-hf"
    picochat(tiny_home, "export", "--source", "base", "--model-tag", "exporttest", "--out", str(out))
    return tiny_home, out


@pytest.fixture
def in_home(monkeypatch):
    """Point this process at a PICOCHAT_HOME (for in-process loading of checkpoints)."""
    def use(home):
        monkeypatch.setenv("PICOCHAT_HOME", str(home))
    return use


def hf_model(folder):
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(folder)
    return model.eval()


def hf_tokenizer(folder):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(folder)


def long_prompts(tokenizer) -> list[list[int]]:
    """Prompts of 100+ tokens (RoPE at many positions), each starting with <|bos|>."""
    texts = ["The king said to the queen: good night, sweet lady. " * 6,
             "What shall we do now? Come, go away, my noble lord! " * 8,
             "Love and death, night and day, heaven and earth; speak, hear, see, know. " * 9]
    prompts = [tokenizer.encode(t, prepend="<|bos|>") for t in texts]
    assert all(len(p) >= 100 for p in prompts)
    return prompts


def chat_ids(tk, messages, **kwargs) -> list[int]:
    out = tk.apply_chat_template(messages, **kwargs)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


# -----------------------------------------------------------------------------
# transformers computes what picochat computes

# Greedy tokens are compared where picochat's top two logits are further apart than this: closer
# than that, the 2e-6 difference between the implementations could legitimately flip the argmax.
TIE_MARGIN = 1e-4


@pytest.mark.slow
def test_transformers_logits_and_greedy_tokens_match_picochat(exported, in_home):
    from picochat.checkpoint import load_model
    from picochat.engine import Engine
    from picochat.scheduler import generate_batch
    from picochat.tokenizer import get_tokenizer
    home, folder = exported
    in_home(home)
    tokenizer = get_tokenizer()
    ours, _ = load_model("base", "exporttest", "cpu", compute_dtype=torch.float32)
    theirs = hf_model(folder)
    assert type(theirs).__name__ == "NanoChatForCausalLM" and theirs.dtype == torch.float32
    assert theirs.lm_head.weight.data_ptr() != theirs.model.embed_tokens.weight.data_ptr()  # untied
    engine = Engine(ours, tokenizer)
    stops = {tokenizer.encode_special("<|assistant_end|>"), tokenizer.bos_id}
    generated = 0
    for prompt in long_prompts(tokenizer):
        greedy = generate_batch(engine, prompt, max_tokens=32, temperature=0.0)[0][0][len(prompt):]
        assert greedy and not stops & set(greedy)
        ids = torch.tensor([prompt + greedy])
        with torch.no_grad():
            expected, got = ours(ids), theirs(ids).logits
        assert torch.allclose(got, expected, rtol=0, atol=LOGITS_ATOL), (got - expected).abs().max()
        # teacher-forced: transformers' greedy choice at each position picochat's Engine decoded
        top2 = expected[0, len(prompt) - 1:-1].topk(2).values
        clear = top2[:, 0] - top2[:, 1] > TIE_MARGIN
        assert clear.float().mean() > 0.5
        choices = got[0, len(prompt) - 1:-1].argmax(-1)
        assert choices[clear].tolist() == torch.tensor(greedy)[clear].tolist()
        if clear.all():  # no near-tie on the way: transformers' own generate() must give the same tokens
            with torch.no_grad():
                out = theirs.generate(torch.tensor([prompt]), max_new_tokens=len(greedy), do_sample=False)
            assert out[0, len(prompt):].tolist() == greedy
            generated += 1
    assert generated  # at least one prompt went through generate()


def test_exported_tokenizer_encodes_exactly_like_picochat(exported, in_home):
    from picochat.tokenizer import get_tokenizer
    home, folder = exported
    in_home(home)
    ours, theirs = get_tokenizer(), hf_tokenizer(folder)
    assert len(theirs) == ours.vocab_size
    assert theirs.bos_token_id == ours.bos_id
    assert theirs.eos_token_id == ours.encode_special("<|assistant_end|>")
    for text in SAMPLES + ["\n".join(SAMPLES)]:
        ids = ours.encode(text)
        assert theirs.encode(text, add_special_tokens=False) == ids, text
        assert theirs(text)["input_ids"] == [ours.bos_id] + ids  # documents start with <|bos|>
        assert theirs.decode(ids) == ours.decode(ids)
    # special-token text: transformers reads it as the special tokens (picochat with allowed_special),
    # or as plain text when asked to split it
    assert theirs.encode(SPECIAL_SAMPLE, add_special_tokens=False) == ours.encode(SPECIAL_SAMPLE, allowed_special=True)
    assert theirs.encode(SPECIAL_SAMPLE, add_special_tokens=False, split_special_tokens=True) == ours.encode(SPECIAL_SAMPLE)


def test_chat_template_renders_picochat_conversation_tokens(exported, in_home):
    from jinja2 import TemplateError

    from picochat.tokenizer import get_tokenizer
    home, folder = exported
    in_home(home)
    ours, theirs = get_tokenizer(), hf_tokenizer(folder)
    for messages in CONVERSATIONS:
        prompt = ours.render_for_completion({"messages": messages})
        assert chat_ids(theirs, messages, add_generation_prompt=True) == prompt, messages
        full, _ = ours.render_conversation({"messages": messages}, max_tokens=10**9)
        assert chat_ids(theirs, messages) == full, messages
    with pytest.raises(TemplateError, match="alternate"):
        theirs.apply_chat_template([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])
    with pytest.raises(TemplateError, match="string content"):
        theirs.apply_chat_template([{"role": "system", "content": ["a"]}, {"role": "user", "content": "b"}])
    # consecutive text parts: the template joins them before tokenizing (docs/EXPORT.md), which is
    # picochat's rendering of the joined part, not of the two parts encoded one by one
    first, second = "Let me say th", "e king's answer"
    assert ours.encode(first + second) != ours.encode(first) + ours.encode(second)  # a boundary inside " the"
    parts = [{"type": "text", "text": first}, {"type": "text", "text": second}]
    split = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": parts}]
    joined = [split[0], {"role": "assistant", "content": [{"type": "text", "text": first + second}]}]
    assert chat_ids(theirs, split) == ours.render_conversation({"messages": joined}, max_tokens=10**9)[0]
    assert chat_ids(theirs, split) != ours.render_conversation({"messages": split}, max_tokens=10**9)[0]
    from transformers import GenerationConfig
    generation = GenerationConfig.from_pretrained(folder)
    assert ours.encode_special("<|assistant_end|>") in generation.eos_token_id
    assert generation.bos_token_id == ours.bos_id


def test_export_folder_is_complete_and_the_card_is_written(exported):
    _, folder = exported
    names = {p.name for p in folder.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "generation_config.json", "README.md", "picochat.json"} <= names
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".")]  # no temp folder left
    card = (folder / "README.md").read_text()
    assert "exporttest" in card and "| 2 | 128 |" in card
    assert shlex.join(["picochat", "base_train", *TRAIN]) in card  # from the run log
    assert "No picochat evaluation was recorded" in card
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "nanochat" and config["rms_norm_eps"] == torch.finfo(torch.float32).eps


# -----------------------------------------------------------------------------
# A model with every 2026 part: transformers runs picochat's own modeling file

PARTS = dict(window_pattern="SSL", short_window=16, value_embeds=True, lambdas=True, smear=True, backout=True,
             rope_base=100_000.0, qk_scale=1.2, init="2026")


@pytest.fixture(scope="module")
def every_part(tiny_home, tmp_path_factory):
    """A GQA GPT with every 2026 part on (windows of 16 tokens, so 100-token prompts run past
    them) and random weights, none of them zero, as a base checkpoint in a home of its own;
    exported with the CLI. Returns (home, model, folder, the export's stdout)."""
    from picochat.checkpoint import save_checkpoint
    from picochat.model import GPT, GPTConfig
    from picochat.tokenizer import Tokenizer
    home = tmp_path_factory.mktemp("parts-home")
    shutil.copytree(tiny_home / "tokenizer", home / "tokenizer")
    tokenizer = Tokenizer.load(home / "tokenizer")
    config = GPTConfig(sequence_len=128, vocab_size=tokenizer.vocab_size, n_layer=4, n_head=4, n_kv_head=2,
                       n_embd=64, **PARTS)
    model = GPT(config)
    model.init_weights(seed=0)
    with torch.no_grad():
        gen = torch.Generator().manual_seed(1)
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.1)
    meta = {"step": 30, "model_config": config.to_dict(), "user_config": {"model_tag": "parts"},
            "compute_dtype": "float32"}
    save_checkpoint(home / "checkpoints" / "base" / "parts", 30, model.state_dict(), meta, {})
    out = tmp_path_factory.mktemp("export") / "parts-hf"
    proc = picochat(home, "export", "--source", "base", "--out", str(out))
    return home, model.eval(), out, proc.stdout


def part_prompts(tokenizer) -> list[list[int]]:
    """100-token prompts (past the 16-token windows, within the 128-token context)."""
    return [p[:100] for p in long_prompts(tokenizer)]


def test_seed_model_exports_to_transformers_own_class_without_code(exported):
    _, folder = exported
    assert json.loads((folder / "config.json").read_text())["architectures"] == ["NanoChatForCausalLM"]
    assert not list(folder.glob("*.py"))


@pytest.mark.slow
def test_every_part_exports_with_its_own_modeling_file_and_the_same_logits(every_part, in_home):
    from transformers import AutoModelForCausalLM

    from picochat.engine import Engine
    from picochat.scheduler import generate_batch
    from picochat.tokenizer import get_tokenizer
    home, ours, folder, stdout = every_part
    in_home(home)
    tokenizer = get_tokenizer()
    assert "trust_remote_code=True" in stdout and "value embeddings" in stdout
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "picochat" and config["auto_map"]["AutoModelForCausalLM"] == \
        "modeling_picochat.PicochatForCausalLM"
    assert {p.name for p in folder.glob("*.py")} == {"configuration_picochat.py", "modeling_picochat.py"}
    assert "trust_remote_code=True" in (folder / "README.md").read_text()
    with pytest.raises(ValueError, match="trust_remote_code"):  # transformers runs no code unasked
        AutoModelForCausalLM.from_pretrained(folder)
    theirs = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    assert type(theirs).__name__ == "PicochatForCausalLM" and theirs.dtype == torch.float32
    engine = Engine(ours, tokenizer)
    stops = {tokenizer.encode_special("<|assistant_end|>"), tokenizer.bos_id}
    generated = 0
    for prompt in part_prompts(tokenizer):
        with torch.no_grad():
            expected, got = ours(torch.tensor([prompt])), theirs(torch.tensor([prompt])).logits
        assert torch.allclose(got, expected, rtol=0, atol=LOGITS_ATOL), (got - expected).abs().max()
        greedy = generate_batch(engine, prompt, max_tokens=24, temperature=0.0)[0][0][len(prompt):]
        assert greedy and not stops & set(greedy)
        with torch.no_grad():
            top2 = ours(torch.tensor([prompt + greedy]))[0, len(prompt) - 1:-1].topk(2).values
        if (top2[:, 0] - top2[:, 1] > TIE_MARGIN).all():  # no near-tie: generate() must give the same tokens
            for use_cache in (True, False):  # the KV cache (windows, smear's predecessor) and the plain loop
                with torch.no_grad():
                    out = theirs.generate(torch.tensor([prompt]), max_new_tokens=len(greedy), do_sample=False,
                                          use_cache=use_cache)
                assert out[0, len(prompt):].tolist() == greedy, use_cache
            generated += 1
    assert generated
    # a left-padded batch: each row generates what it generates alone
    short, long = part_prompts(tokenizer)[0][:60], part_prompts(tokenizer)[1]
    pad = len(long) - len(short)
    ids = torch.tensor([[0] * pad + short, long])
    mask = torch.tensor([[0] * pad + [1] * len(short), [1] * len(long)])
    with torch.no_grad():
        both = theirs.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0)
        for row, prompt in enumerate([short, long]):
            alone = theirs.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False)
            assert both[row, len(long):].tolist() == alone[0, len(prompt):].tolist(), row


@pytest.mark.slow
def test_every_part_export_imports_back_bit_for_bit(every_part, tmp_path, in_home):
    from picochat.checkpoint import latest_step, load_checkpoint
    from picochat.common import checkpoint_dir
    _, ours, folder, _ = every_part
    fresh = tmp_path / "home"
    picochat(fresh, "import", str(folder), "--stage", "base")
    in_home(fresh)
    root = checkpoint_dir("base", "parts")
    state, meta, _ = load_checkpoint(root, latest_step(root), "cpu")
    assert meta["step"] == 30 and meta["model_config"] == dict(ours.config.to_dict(), init="seed")
    assert state.keys() == ours.state_dict().keys()
    assert all(torch.equal(state[k], v) for k, v in ours.state_dict().items())


# -----------------------------------------------------------------------------
# Round trips

@pytest.mark.slow
def test_export_then_import_gives_identical_weights_and_tokenizer(exported, tmp_path, in_home):
    from picochat.checkpoint import latest_step, load_checkpoint
    from picochat.common import checkpoint_dir
    from picochat.tokenizer import Tokenizer, get_tokenizer
    home, folder = exported
    in_home(home)
    before = get_tokenizer()
    original_root = checkpoint_dir("base", "exporttest")
    original, _, _ = load_checkpoint(original_root, latest_step(original_root), "cpu")
    fresh = tmp_path / "home"  # a model from elsewhere goes into a home of its own
    picochat(fresh, "import", str(folder), "--stage", "mid")
    in_home(fresh)
    back_root = checkpoint_dir("mid", "exporttest")  # the tag comes back from picochat.json
    back, meta, _ = load_checkpoint(back_root, latest_step(back_root), "cpu")
    assert meta["step"] == latest_step(original_root) and meta["imported"]["format"] == "transformers"
    assert back.keys() == original.keys()
    assert all(torch.equal(back[k], original[k]) and back[k].dtype == original[k].dtype for k in original)
    for tokenizer in (get_tokenizer(), Tokenizer.load(back_root / "tokenizer")):
        assert (tokenizer.tokens, tokenizer.pattern, tokenizer.special_ids) == (before.tokens, before.pattern,
                                                                                before.special_ids)
        assert all(tokenizer.encode(s) == before.encode(s) for s in SAMPLES)
    # an existing tag is kept unless --force
    assert_refused(picochat(fresh, "import", str(folder), "--stage", "mid", check=False), "exists", "--force")
    picochat(fresh, "import", str(folder), "--stage", "mid", "--force")
    chat = picochat(fresh, "chat", "--source", "mid", "-p", "Hello", "-t", "0", "--plain",
                    "--max-tokens", "8", "--device", "cpu")
    assert "Assistant" in chat.stdout


def write_nanochat_layout(cache, tokenizer, model, step: int, prefix: str = "_orig_mod."):
    """A nanochat cache as nanochat writes it: <cache>/base_checkpoints/<tag>/model_NNNNNN.pt and
    meta_NNNNNN.json, <cache>/tokenizer/tokenizer.pkl (a pickled tiktoken Encoding) and token_bytes.pt."""
    ckpt = cache / "base_checkpoints" / "d2gqa"
    ckpt.mkdir(parents=True)
    state = {prefix + k: v for k, v in model.state_dict().items()}
    state[prefix + "transformer.wte.weight"] = state[prefix + "transformer.wte.weight"].bfloat16()  # as on CUDA
    torch.save(state, ckpt / f"model_{step:06d}.pt")
    sizes = ("sequence_len", "vocab_size", "n_layer", "n_head", "n_kv_head", "n_embd")  # the seed's model_config
    meta = {"step": step, "val_bpb": 1.5, "model_config": {k: getattr(model.config, k) for k in sizes},
            "user_config": {"depth": 2}}
    (ckpt / f"meta_{step:06d}.json").write_text(json.dumps(meta))
    (cache / "tokenizer").mkdir()
    ranks = {token: i for i, token in enumerate(tokenizer.tokens)}
    encoding = tiktoken.Encoding("rustbpe", pat_str=tokenizer.pattern, mergeable_ranks=ranks,
                                 special_tokens=tokenizer.special_ids)
    (cache / "tokenizer" / "tokenizer.pkl").write_bytes(pickle.dumps(encoding))
    torch.save(tokenizer.token_bytes(), cache / "tokenizer" / "token_bytes.pt")
    return ckpt


@pytest.fixture
def nanochat_model(tiny_home, in_home):
    """A GQA GPT (4 query heads, 2 key/value heads) with random weights, none of them zero, and the
    tiny tokenizer; wte is rounded to bf16 as nanochat stores it, so the file holds this model exactly."""
    from picochat.model import GPT, GPTConfig
    from picochat.tokenizer import get_tokenizer
    in_home(tiny_home)
    tokenizer = get_tokenizer()
    model = GPT(GPTConfig(sequence_len=256, vocab_size=tokenizer.vocab_size, n_layer=2, n_head=4,
                          n_kv_head=2, n_embd=128))
    model.init_weights(seed=0)
    with torch.no_grad():
        gen = torch.Generator().manual_seed(1)
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
        model.transformer.wte.weight.copy_(model.transformer.wte.weight.bfloat16().float())
    return model.eval(), tokenizer


@pytest.mark.slow
def test_nanochat_checkpoint_imports_with_the_same_logits(nanochat_model, tmp_path, in_home):
    from picochat.checkpoint import load_model
    from picochat.tokenizer import get_tokenizer
    model, tokenizer = nanochat_model
    ckpt = write_nanochat_layout(tmp_path / "nanochat", tokenizer, model, step=123)
    home = tmp_path / "home"
    picochat(home, "import", str(ckpt), "--stage", "base")
    in_home(home)
    imported, meta = load_model("base", "d2gqa", "cpu", compute_dtype=torch.float32)
    assert meta["step"] == 123 and meta["imported"]["format"] == "nanochat"
    assert get_tokenizer().tokens == tokenizer.tokens
    for prompt in long_prompts(tokenizer):
        ids = torch.tensor([prompt])
        with torch.no_grad():
            assert torch.equal(imported(ids), model(ids))
    # and the GQA model goes on to transformers too
    out = tmp_path / "gqa-hf"
    picochat(home, "export", "--source", "base", "--out", str(out))
    theirs = hf_model(out)
    for prompt in long_prompts(tokenizer):
        ids = torch.tensor([prompt])
        with torch.no_grad():
            assert torch.allclose(theirs(ids).logits, model(ids), rtol=0, atol=LOGITS_ATOL)


# -----------------------------------------------------------------------------
# Refusals: one line, exit 2, nothing half-written

def assert_refused(proc, *phrases):
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    for phrase in phrases:
        assert phrase in proc.stderr, proc.stderr


def assert_nothing_imported(home, tag):
    assert not (home / "checkpoints" / "base" / tag).exists()
    assert not (home / "checkpoints" / "base" / ".importing").exists()


@pytest.mark.slow
def test_broken_or_foreign_nanochat_checkpoints_are_refused(nanochat_model, tmp_path):
    model, tokenizer = nanochat_model
    home = tmp_path / "home"

    def layout(name):
        return write_nanochat_layout(tmp_path / name, tokenizer, model, step=5)

    extra = layout("extra")
    state = torch.load(extra / "model_000005.pt", weights_only=True)
    state["_orig_mod.transformer.h.0.attn.c_q.bias"] = torch.zeros(128)  # no nanochat design has biases
    torch.save(state, extra / "model_000005.pt")
    assert_refused(picochat(home, "import", str(extra), "--stage", "base", check=False),
                   "unexpected tensor transformer.h.0.attn.c_q.bias")

    shape = layout("shape")
    state = torch.load(shape / "model_000005.pt", weights_only=True)
    state["_orig_mod.lm_head.weight"] = torch.zeros(64, 128)
    torch.save(state, shape / "model_000005.pt")
    assert_refused(picochat(home, "import", str(shape), "--stage", "base", check=False),
                   "lm_head.weight has shape [64, 128]")

    truncated = layout("truncated")
    data = (truncated / "model_000005.pt").read_bytes()
    (truncated / "model_000005.pt").write_bytes(data[:len(data) // 2])
    assert_refused(picochat(home, "import", str(truncated), "--stage", "base", check=False),
                   "model_000005.pt is truncated")

    bad_pickle = layout("pickle")
    pkl = bad_pickle.parent.parent / "tokenizer" / "tokenizer.pkl"
    pkl.write_bytes(pkl.read_bytes()[:100])
    assert_refused(picochat(home, "import", str(bad_pickle), "--stage", "base", check=False),
                   "tokenizer.pkl is truncated")

    evil = layout("evil")
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))
    (evil.parent.parent / "tokenizer" / "tokenizer.pkl").write_bytes(pickle.dumps(Evil()))
    assert_refused(picochat(home, "import", str(evil), "--stage", "base", check=False), "refers to", "system")
    assert not marker.exists()
    for tag in ("d2gqa",):
        assert_nothing_imported(home, tag)


@pytest.mark.slow
def test_broken_transformers_folders_are_refused(exported, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file
    home, folder = exported
    target = tmp_path / "home"

    def copy(name):
        dst = tmp_path / name
        shutil.copytree(folder, dst)
        return dst

    extra = copy("extra")
    tensors = load_file(extra / "model.safetensors")
    tensors["model.layers.0.self_attn.q_norm.weight"] = torch.ones(128)
    save_file(tensors, extra / "model.safetensors")
    assert_refused(picochat(target, "import", str(extra), "--stage", "base", "--model-tag", "x", check=False),
                   "unexpected tensor model.layers.0.self_attn.q_norm.weight")

    shape = copy("shape")
    tensors = load_file(shape / "model.safetensors")
    tensors["model.layers.1.mlp.fc1.weight"] = torch.zeros(256, 128)
    save_file(tensors, shape / "model.safetensors")
    assert_refused(picochat(target, "import", str(shape), "--stage", "base", "--model-tag", "x", check=False),
                   "transformer.h.1.mlp.c_fc.weight has shape [256, 128]")

    truncated = copy("truncated")
    data = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[:len(data) - 1000])
    assert_refused(picochat(target, "import", str(truncated), "--stage", "base", "--model-tag", "x", check=False),
                   "model.safetensors is truncated")

    other = copy("other")
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps(dict(config, hidden_act="silu")))
    assert_refused(picochat(target, "import", str(other), "--stage", "base", "--model-tag", "x", check=False),
                   "hidden_act is 'silu'")
    assert_nothing_imported(target, "x")


@pytest.mark.slow
def test_export_refuses_a_foreign_checkpoint_and_an_existing_folder(exported, tmp_path, in_home):
    import shutil

    from picochat.checkpoint import latest_step, load_checkpoint, save_checkpoint
    from picochat.common import checkpoint_dir
    home, folder = exported
    assert_refused(picochat(home, "export", "--source", "base", "--model-tag", "exporttest", "--out", str(folder),
                            check=False), "exists", "--force")
    in_home(home)
    root = checkpoint_dir("base", "exporttest")
    state, meta, _ = load_checkpoint(root, latest_step(root), "cpu")
    state["transformer.h.0.attn.c_q.bias"] = torch.zeros(128)  # a layout transformers' class has no place for
    other = tmp_path / "home"
    shutil.copytree(home / "tokenizer", other / "tokenizer")
    in_home(other)
    save_checkpoint(checkpoint_dir("base", "biased"), meta["step"], state, meta, {})
    out = tmp_path / "exports" / "bias-hf"
    out.parent.mkdir()
    assert_refused(picochat(other, "export", "--source", "base", "--out", str(out), check=False),
                   "unexpected tensor transformer.h.0.attn.c_q.bias")
    assert list(out.parent.iterdir()) == []  # neither the folder nor a temporary one


# -----------------------------------------------------------------------------
# The model card's records, and failures part-way (in process: cheap)

def test_model_card_lists_the_runs_and_evaluations_of_its_checkpoints(tmp_path, in_home):
    from picochat.report import log_run, run_log_path
    from picochat.stages.export import eval_lines, run_commands
    in_home(tmp_path)
    for stage, argv, exit_code in [
            ("base_train", ["--depth", "4"], 0),                       # tag d4 (the default d<depth>)
            ("base_train", [], 0),                                     # tag d20
            ("base_train", ["--model-tag=mine", "--depth", "2"], 0),
            ("base_train", ["--model-tag", "mine"], 1),                # failed
            ("mid_train", ["--source-tag", "d4"], 0),                  # keeps its source's tag
            ("sft", ["--model-tag", "chat", "--source", "mid"], 0),
            ("sft", [], 0),                                            # "the only" model: tag unknown
            ("base_eval", ["--model-tag", "d4"], 0)]:
        log_run(stage, argv, 0.0, 1.0, exit_code)
    with open(run_log_path(), "a") as f:  # lines log_run never writes are skipped
        f.write('{"argv": ["--model-tag", "d4"], "exit_code": 0}\n["x"]\n'
                '{"stage": "sft", "argv": "--model-tag chat", "exit_code": 0}\n{"stage": "sft", "ar\n')
    chain = [("base", "d4", 40, {}), ("mid", "d4", 10, {}), ("sft", "chat", 5, {})]
    assert run_commands(chain) == ["picochat base_train --depth 4", "picochat mid_train --source-tag d4",
                                   "picochat sft --model-tag chat --source mid"]
    assert run_commands([("base", "mine", 1, {})]) == ["picochat base_train --model-tag=mine --depth 2"]
    assert run_commands([("base", "d20", 1, {})]) == ["picochat base_train"]

    evals = tmp_path / "evals"
    evals.mkdir()
    core = {"metric": "CORE-subset", "tasks_run": 14, "tasks_total": 22, "score": 0.1234,
            "tasks": {"hellaswag": {"accuracy": 0.3, "centered": 0.1}}}
    (evals / "base_d4_step000040.json").write_text(json.dumps(
        {"core": core, "train_bpb": 1.5, "val_bpb": 1.625, "step": 40, "samples": ["x"]}))
    (evals / "chat_sft_chat_step000005.json").write_text(json.dumps(
        {"source": "sft", "model_tag": "chat", "step": 5, "results": {"ARC-Easy": 0.3, "ARC-Easy_chance": 0.25},
         "problems": {"ARC-Easy": 100}, "chatcore": 0.05}))
    assert eval_lines(chain) == [
        "- base d4 step 40: CORE-subset 0.1234 over 14 tasks",
        "- base d4 step 40: train bits per byte 1.5000",
        "- base d4 step 40: val bits per byte 1.6250",
        "- sft chat step 5: ARC-Easy accuracy 0.3000 over 100 problems (baseline: the best constant answer "
        "scores 0.2500)",
        "- sft chat step 5: ChatCORE 0.0500"]


def raise_disk_full(*args, **kwargs):
    raise OSError(28, "No space left on device")


def test_a_failed_import_or_export_leaves_nothing_and_keeps_what_was_there(exported, tmp_path, in_home, monkeypatch):
    from picochat.checkpoint import latest_step, load_meta
    from picochat.common import checkpoint_dir, tokenizer_dir
    from picochat.interop import hf
    from picochat.stages import export, import_
    from picochat.tokenizer import Tokenizer
    _, folder = exported
    home = tmp_path / "home"
    in_home(home)
    shared = hf.tokenizer_from_hf(folder / "tokenizer.json")
    shared.trained_on = "tiny"  # the same tokenizer, with what tok_train records
    shared.save(tokenizer_dir())
    import_.main([str(folder), "--stage", "base", "--model-tag", "a"])
    assert Tokenizer.load(tokenizer_dir()).trained_on == "tiny"  # the same tokenizer is not rewritten
    root = checkpoint_dir("base", "a")
    (root / "marker").write_text("the old checkpoint")
    scratch = root.parent / ".importing"

    real_save = import_.save_checkpoint
    monkeypatch.setattr(import_, "save_checkpoint", raise_disk_full)
    for tag, force in (("b", []), ("a", ["--force"])):
        with pytest.raises(PicochatError, match="No space left"):
            import_.main([str(folder), "--stage", "base", "--model-tag", tag, *force])
    monkeypatch.setattr(import_, "save_checkpoint", real_save)
    assert not checkpoint_dir("base", "b").exists() and not scratch.exists()
    assert (root / "marker").exists()

    real_replace = os.replace

    def last_rename_fails(src, dst):  # the complete new checkpoint cannot be renamed into place
        if Path(dst) == root and not str(src).endswith(".old"):
            raise OSError(18, "Invalid cross-device link")
        return real_replace(src, dst)
    monkeypatch.setattr(os, "replace", last_rename_fails)
    with pytest.raises(PicochatError, match="cross-device"):
        import_.main([str(folder), "--stage", "base", "--model-tag", "a", "--force"])
    monkeypatch.setattr(os, "replace", real_replace)
    assert (root / "marker").exists() and latest_step(root) is not None and not scratch.exists()
    import_.main([str(folder), "--stage", "base", "--model-tag", "a", "--force"])
    assert not (root / "marker").exists() and load_meta(root, latest_step(root))["imported"]["format"] == "transformers"

    # export: a failure while writing leaves neither the folder nor a temporary one, and an
    # earlier export replaced with --force survives it
    out = tmp_path / "exports" / "a-hf"
    export.main(["--source", "base", "--model-tag", "a", "--out", str(out)])
    (out / "marker").write_text("the old export")
    monkeypatch.setattr(hf, "save_weights", raise_disk_full)
    for name, force in (("b-hf", []), ("a-hf", ["--force"])):
        with pytest.raises(PicochatError, match="No space left"):
            export.main(["--source", "base", "--model-tag", "a", "--out", str(out.with_name(name)), *force])
    assert sorted(p.name for p in out.parent.iterdir()) == ["a-hf"] and (out / "marker").exists()


def test_export_prefers_the_checkpoint_own_tokenizer_and_replaces_only_an_export(exported, tmp_path, in_home,
                                                                                 monkeypatch):
    from picochat.common import checkpoint_dir, tokenizer_dir
    from picochat.interop import hf
    from picochat.stages import export, import_
    from picochat.tokenizer import Tokenizer
    _, folder = exported
    in_home(tmp_path / "home")
    import_.main([str(folder), "--stage", "base", "--model-tag", "a"])
    own = Tokenizer.load(checkpoint_dir("base", "a") / "tokenizer")
    tokens = list(own.tokens)  # another tokenizer of the same size: two multi-byte tokens swapped
    i, j = len(tokens) - 1, len(tokens) - 2
    tokens[i], tokens[j] = tokens[j], tokens[i]
    Tokenizer({t: k for k, t in enumerate(tokens)}, own.pattern).save(tokenizer_dir())
    out = tmp_path / "a-hf"
    export.main(["--source", "base", "--out", str(out)])
    assert hf.tokenizer_from_hf(out / "tokenizer.json").tokens == own.tokens != tokens

    notes = tmp_path / "notes"
    (notes / "sub").mkdir(parents=True)
    (notes / "sub" / "keep.txt").write_text("mine")
    monkeypatch.chdir(notes)
    for target, phrase in ((".", "refusing"), (str(notes), "refusing"), ("/", "refusing"),
                           ("sub", "not an earlier export")):
        assert_one_line_refusal(lambda: export.main(["--source", "base", "--out", target, "--force"]), phrase)
    assert (notes / "sub" / "keep.txt").read_text() == "mine"


# -----------------------------------------------------------------------------
# Malformed or crafted inputs: refused in one line, in process

def assert_one_line_refusal(call, phrase):
    with pytest.raises(PicochatError, match=phrase) as caught:
        call()
    assert "\n" not in str(caught.value).rstrip("\n"), str(caught.value)


def test_tokenizer_json_that_would_tokenize_differently_is_refused(exported, tmp_path):
    from picochat.interop import hf
    _, folder = exported
    good = json.loads((folder / "tokenizer.json").read_text())
    assert hf.tokenizer_from_hf(folder / "tokenizer.json").tokens  # what export writes is accepted

    def drop_byte_zero(data):
        vocab = data["model"]["vocab"]
        vocab[hf.BYTE_CHARS[0] * 7] = vocab.pop(hf.BYTE_CHARS[0])  # ids stay 0..n-1

    cases = [
        (lambda d: d.update(normalizer={"type": "NFC"}), "a normalizer"),
        (lambda d: d["pre_tokenizer"]["pretokenizers"][1].update(add_prefix_space=True), "pre-tokenizer"),
        (lambda d: d["pre_tokenizer"]["pretokenizers"].append({"type": "Digits", "individual_digits": True}),
         "pre-tokenizer"),
        (lambda d: d["model"].update(ignore_merges=False), "BPE options"),
        (lambda d: d["model"]["merges"].reverse(), "merges other than"),
        (lambda d: d["pre_tokenizer"]["pretokenizers"][0]["pattern"].update(Regex="(unclosed"), "Parsing error"),
        (lambda d: d.update(pre_tokenizer=None), "not a byte-level BPE"),
        (drop_byte_zero, "single bytes"),
    ]
    for k, (edit, phrase) in enumerate(cases):
        data = copy.deepcopy(good)
        edit(data)
        path = tmp_path / f"tokenizer{k}.json"
        path.write_text(json.dumps(data))
        assert_one_line_refusal(lambda: hf.tokenizer_from_hf(path), phrase)


def test_malformed_transformers_metadata_is_refused(exported, tmp_path, in_home):
    from safetensors.torch import load_file, save_file

    from picochat.interop import hf
    from picochat.stages import import_
    _, folder = exported
    home = tmp_path / "home"
    in_home(home)
    src = tmp_path / "src"
    shutil.copytree(folder, src)

    def refused(name, content, phrase):
        original = (src / name).read_text()
        (src / name).write_text(content if isinstance(content, str) else json.dumps(content))
        assert_one_line_refusal(lambda: import_.main([str(src), "--stage", "base"]), phrase)
        (src / name).write_text(original)
        assert not (home / "checkpoints" / "base").exists()

    for provenance, phrase in [({"step": -3}, "step -3"), ({"step": "abc"}, "step 'abc'"), ({"step": True}, "step"),
                               ({"model_tag": 5}, "model_tag 5"), ({"model_tag": "../x"}, "model_tag '../x'"),
                               ({"model_tag": "a\n"}, "model_tag"), (["x"], "not a JSON object"),
                               ("{", "not valid JSON")]:
        refused("picochat.json", provenance, phrase)
    config = json.loads((src / "config.json").read_text())
    for bad, phrase in [([config], "a list, not a JSON object"),
                        (dict(config, hidden_size="128"), "hidden_size is '128'"),
                        (dict(config, num_key_value_heads=2.0), "num_key_value_heads"),
                        (dict(config, rope_scaling={"rope_type": "linear", "factor": 2.0}), "rope_scaling type"),
                        (dict(config, partial_rotary_factor=0.5), "partial_rotary_factor")]:
        refused("config.json", bad, phrase)

    for shard in ("../model.safetensors", str(src / "model.safetensors"), ".."):
        (src / hf.WEIGHTS_INDEX).write_text(json.dumps({"weight_map": {"lm_head.weight": shard}}))
        assert_one_line_refusal(lambda: hf.load_weights(src), "not a file name")
    (src / hf.WEIGHTS_INDEX).unlink()

    tensors = load_file(src / "model.safetensors")
    save_file({k: v.bfloat16() for k, v in tensors.items()}, src / "model.safetensors")
    widened = hf.load_weights(src)
    assert all(t.dtype == torch.float32 for t in widened.values())
    assert torch.equal(widened["lm_head.weight"], tensors["lm_head.weight"].bfloat16().float())


def test_nanochat_imports_refuse_old_torch_pickled_code_and_partial_tokenizers(nanochat_model, tmp_path,
                                                                              in_home, monkeypatch):
    from picochat.common import checkpoint_dir
    from picochat.interop import nanochat
    from picochat.stages import import_
    model, tokenizer = nanochat_model
    ckpt = write_nanochat_layout(tmp_path / "nanochat", tokenizer, model, step=5)
    home = tmp_path / "home"
    in_home(home)

    def run(*args):
        return import_.main([*args, "--stage", "base"])

    version = torch.__version__
    monkeypatch.setattr(torch, "__version__", "2.5.1")  # torch.load(weights_only=True) can run code there
    assert_one_line_refusal(lambda: run(str(ckpt)), r"needs torch >= 2\.6")
    monkeypatch.setattr(torch, "__version__", version)

    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))
    torch.save({"transformer.wte.weight": Evil()}, ckpt / "model_000007.pt")
    shutil.copy(ckpt / "meta_000005.json", ckpt / "meta_000007.json")
    assert_one_line_refusal(lambda: run(str(ckpt), "--step", "7"), "not a weights-only torch checkpoint")
    assert not marker.exists()

    shutil.copy(ckpt / "model_000005.pt", ckpt / "model_000009.pt")
    (ckpt / "meta_000009.json").mkdir()  # unreadable, and not for lack of the file
    assert_one_line_refusal(lambda: run(str(ckpt), "--step", "9"), "meta_000009.json is unreadable")
    assert not (home / "checkpoints").exists()

    monkeypatch.chdir(ckpt)  # a relative path finds nanochat's tokenizer at ../../tokenizer all the same
    run(".", "--step", "5", "--model-tag", "rel")
    assert (checkpoint_dir("base", "rel") / "tokenizer").is_dir()

    ranks = {token: i for i, token in enumerate(tokenizer.tokens)}
    ranks[b"\x00" * 9] = ranks.pop(b"\x00")  # no single byte 0: tiktoken would panic on it later
    partial = tmp_path / "partial"
    partial.mkdir()
    encoding = tiktoken.Encoding("partial", pat_str=tokenizer.pattern, mergeable_ranks=ranks,
                                 special_tokens=tokenizer.special_ids)
    (partial / "tokenizer.pkl").write_bytes(pickle.dumps(encoding))
    assert_one_line_refusal(lambda: nanochat.read_tokenizer(partial), "single bytes")
