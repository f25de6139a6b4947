"""Issue 12: continuous batching in the local engine, on the real packaged SmolLM2 (int8 and fp32), with real
LoRA adapters mixed per row, and 16 streaming clients against the real HTTP server on localhost."""

from __future__ import annotations

import json
import threading
import time
import urllib.request
from types import SimpleNamespace

import pytest

from serving import webapp
from serving.config import ServingError
from serving.generation import GenerationParams, LocalGenerator

SYSTEM = {"role": "system", "content": "You answer questions about heat pumps briefly and exactly."}
CASES = [  # different prompts, lengths and adapters, some with none; three share the system prompt
    ([SYSTEM, {"role": "user", "content": "What is a heat pump?"}], None),
    ([{"role": "user", "content": "Name three colours."}], "alpha"),
    ([SYSTEM, {"role": "user", "content": "How loud is a fan rated for 38 dB? Explain in detail, with examples of "
                                         "everyday sounds at similar levels, and say where to install it."}], "beta"),
    ([{"role": "user", "content": "Write a haiku about snow."}], None),
    ([SYSTEM, {"role": "user", "content": "Why defrost?"}], "alpha"),
]
TOKENS = 14


def params(**kw) -> GenerationParams:
    return GenerationParams(max_new_tokens=kw.pop("max_new_tokens", TOKENS), repetition_penalty=1.1, **kw)


def together(gen, cases, make_params=params, stagger: float = 0.0) -> list[str]:
    """Each case streamed from its own thread at once (optionally staggered): one batch in the engine."""
    out: list = [None] * len(cases)

    def run(i):
        time.sleep(stagger * i)
        try:
            out[i] = gen.stream(cases[i][0], cases[i][1], make_params()).text()
        except Exception as exc:  # noqa: BLE001 - compared below
            out[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(cases))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    return out


@pytest.fixture(scope="module")
def fp32_generator(serving_home):
    return LocalGenerator("smollm2-135m-instruct", serving_home, quantize="none")


@pytest.mark.parametrize("which", ["int8", "int8, bf16 prefill", "none"])
def test_mixed_batch_equals_each_request_alone(which, serving_generator, bf16_generator, fp32_generator):
    gen = {"int8": serving_generator, "int8, bf16 prefill": bf16_generator, "none": fp32_generator}[which]
    make = (lambda: params(prefill_bf16=which != "int8"))
    alone = [gen.stream(m, a, make()).text() for m, a in CASES]
    steps = gen.engine.steps
    batched = together(gen, CASES, make)
    assert batched == alone
    assert gen.engine.max_batch_seen >= 3 and gen.engine.steps - steps < len(CASES) * TOKENS  # rows shared steps
    assert len(set(alone)) == len(alone)  # the cases (and adapters) really differ


def test_join_cancel_and_stop_leave_the_others_unchanged(serving_generator):
    gen = serving_generator
    long = params(max_new_tokens=24)
    alone = [gen.stream(m, a, long).text() for m, a in CASES[:3]]
    stop_at = alone[1].split()[2]
    stopped_alone = gen.stream(CASES[1][0], CASES[1][1], params(max_new_tokens=24, stop=(stop_at,))).text()
    assert stop_at not in stopped_alone

    results: dict[str, object] = {}
    cancelled = gen.stream(CASES[3][0], CASES[3][1], params(max_new_tokens=200))
    first = next(cancelled)  # decoding in the batch

    def run(name, case, p, delay):
        time.sleep(delay)
        results[name] = gen.stream(case[0], case[1], p).text()

    threads = [threading.Thread(target=run, args=("a", CASES[0], long, 0.0)),
               threading.Thread(target=run, args=("stop", CASES[1], params(max_new_tokens=24, stop=(stop_at,)), 0.0)),
               threading.Thread(target=run, args=("late", CASES[2], long, 1.0))]  # joins mid-batch
    for t in threads:
        t.start()
    time.sleep(0.5)
    cancelled.close()  # a client gone: its row leaves at the next step
    for t in threads:
        t.join(300)
    assert first and cancelled.completion_tokens < 200
    assert results == {"a": alone[0], "stop": stopped_alone, "late": alone[2]}
    assert gen.engine.stats()["rows"] == 0  # nothing left behind


def test_kv_bound_queues_then_answers_and_refuses_what_never_fits(serving_home, serving_generator):
    gen = serving_generator
    alone = [gen.stream(m, a, params()).text() for m, a in CASES[:3]]
    longest = max(len(gen.render(m)) for m, _ in CASES[:3]) + TOKENS
    engine = gen.engine
    saved = engine.kv_cache_tokens
    engine.kv_cache_tokens = 2 * longest  # room for two rows of the longest request, not three
    try:
        streams = [gen.stream(*CASES[0], params())]
        # submitted to an idle engine: admitted at its next step, never shown as waiting for a slot
        assert engine.stats()["blocked"] == 0 and webapp.queue_note(SimpleNamespace(generator=gen)) is None
        streams += [gen.stream(m, a, params()) for m, a in CASES[1:3]]
        notes = set()
        while streams[2].finished_s is None and not notes:  # the third is kept out while the first two hold the room
            if engine.stats()["blocked"]:
                notes.add(webapp.queue_note(SimpleNamespace(generator=gen)))
            time.sleep(0.002)
        texts = [s.text() for s in streams]
        assert texts == alone
        assert max(s.queued_s for s in streams) > 0  # the third waited for room
        assert len(notes) == 1 and "1 waiting for a free slot" in notes.pop()
        with pytest.raises(ServingError, match="kv_cache_tokens"):
            gen.stream(CASES[2][0], None, params(max_new_tokens=2 * longest))
    finally:
        engine.kv_cache_tokens = saved


def test_sixteen_streaming_clients_get_their_own_answers(serving_generator):
    from serving.openai_server import serve_in_thread

    gen = serving_generator
    questions = [f"In one sentence: what is {w}?" for w in ("a heat pump", "a fan", "frost", "a compressor", "a filter",
                                                             "a thermostat", "a duct", "a coil")]
    cases = [(q, ("alpha", "beta", None, None)[i % 4]) for i in range(16) for q in [questions[i % 8]]]
    expected = {i: gen.stream([{"role": "user", "content": q}], a, params(max_new_tokens=8)).text()
                for i, (q, a) in enumerate(cases)}
    server, url = serve_in_thread(gen)
    got: dict[int, object] = {}
    try:
        def client(i):
            q, a = cases[i]
            body = json.dumps({"model": a or gen.base_id, "messages": [{"role": "user", "content": q}], "max_tokens": 8,
                               "stream": True, "repetition_penalty": 1.1, "temperature": 0}).encode()
            request = urllib.request.Request(url + "/chat/completions", body, {"Content-Type": "application/json"})
            text = []
            try:
                with urllib.request.urlopen(request, timeout=300) as response:
                    for raw in response:
                        raw = raw.strip()
                        if raw.startswith(b"data:") and raw[5:].strip() != b"[DONE]":
                            event = json.loads(raw[5:])
                            assert "error" not in event, event
                            for choice in event["choices"]:
                                text.append((choice.get("delta") or {}).get("content") or "")
                got[i] = "".join(text)
            except Exception as exc:  # noqa: BLE001 - compared below
                got[i] = exc

        threads = [threading.Thread(target=client, args=(i,)) for i in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
        assert got == expected  # every client got its own prompt's answer with its own adapter, no errors
        after = json.dumps({"model": gen.base_id, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}).encode()
        with urllib.request.urlopen(urllib.request.Request(url + "/chat/completions", after,
                                                           {"Content-Type": "application/json"}), timeout=120) as r:
            assert json.loads(r.read())["choices"][0]["message"]["content"] is not None
    finally:
        server.shutdown()
        server.server_close()


def test_engine_accounts_where_its_time_goes(serving_generator):
    """busy_seconds: prefill, decode forwards, token choice and batch edits grow with a request; the prompt
    tokens counted are at most the rendered prompt (a reused system-prompt prefix is not run again)."""
    gen = serving_generator
    messages, adapter = CASES[0]
    before = gen.engine.busy_seconds()
    stream = gen.stream(messages, adapter, params(max_new_tokens=6))
    stream.text()
    after = gen.engine.busy_seconds()
    spent = {k: after[k] - before[k] for k in after}
    assert 0 < spent["prefill_tokens"] <= len(gen.render(messages)), spent
    assert spent["prefill"] > 0 and spent["choose"] > 0 and spent["batch_edit"] > 0, spent
    assert stream.completion_tokens < 2 or spent["decode_forward"] > 0, spent


def test_per_row_lora_equals_peft_and_refuses_what_it_cannot_apply(serving_home, fp32_generator, tmp_path):
    """The engine applies adapters itself (serving.generation.lora, no peft at serving time): a row with
    adapter 'alpha' decodes greedily what peft's own PeftModel.generate gives with the same adapter on the
    same fp32 base, and differs from the base. Adapter folders it cannot reproduce are refused with why."""
    import shutil

    import torch

    from serving.generation.lora import LoraError, LoraSet
    from tuning.adapters import adapter_dir, load_for_inference

    gen = fp32_generator
    messages = [{"role": "user", "content": "Name three colours."}]
    ids = gen.render(messages)
    ours = gen.stream(messages, "alpha", GenerationParams(max_new_tokens=12, repetition_penalty=1.0)).text()
    base = gen.stream(messages, None, GenerationParams(max_new_tokens=12, repetition_penalty=1.0)).text()
    model, tokenizer, _ = load_for_inference(serving_home, "alpha", device="cpu")
    with torch.inference_mode():
        out = model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False, repetition_penalty=1.0,
                             pad_token_id=tokenizer.eos_token_id)
    assert ours == tokenizer.decode(out[0, len(ids):], skip_special_tokens=True)
    assert ours != base

    folder = tmp_path / "dora"
    shutil.copytree(adapter_dir(serving_home, "alpha"), folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    lora = LoraSet(torch.nn.Module())
    (folder / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(LoraError, match="DoRA"):
        lora.load("k", folder)
    (folder / "adapter_config.json").write_text(json.dumps(config))
    (folder / "adapter_model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(LoraError, match="cannot be read"):
        lora.load("k", folder)
    (folder / "adapter_model.safetensors").rename(folder / "adapter_model.bin")
    with pytest.raises(LoraError, match="safetensors"):
        lora.load("k", folder)
    assert not lora.layers and not lora.loaded  # nothing half-loaded


def test_packed_int8_siblings_give_the_same_bits_as_separate_layers(serving_generator):
    """q/k/v and gate/up are packed into one int8 matrix each (one fbgemm call): every layer's output,
    alone and in a batch of rows, equals the separately quantized layer's bit for bit; the served model
    really is packed (its q_proj, k_proj and v_proj share one group)."""
    import copy

    import torch
    from torch import nn

    from serving.generation import int8

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.q_proj, self.k_proj, self.v_proj = nn.Linear(96, 96), nn.Linear(96, 32), nn.Linear(96, 32)
            self.gate_proj, self.up_proj, self.down_proj = (nn.Linear(96, 160, bias=False), nn.Linear(96, 160, bias=False),
                                                            nn.Linear(160, 96, bias=False))

        def forward(self, x):
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
            return torch.cat([q, k, v], -1), self.down_proj(self.gate_proj(x) * self.up_proj(x))

    torch.manual_seed(0)
    packed = Block()
    separate = copy.deepcopy(packed)
    assert int8.quantize_int8(packed) == 6
    saved, int8.FUSED = int8.FUSED, ()
    try:
        assert int8.quantize_int8(separate) == 6
    finally:
        int8.FUSED = saved
    assert packed.q_proj.group is packed.k_proj.group is packed.v_proj.group
    assert packed.gate_proj.group is packed.up_proj.group and not hasattr(separate.q_proj, "group")
    with torch.inference_mode():
        for rows in (1, 5):
            for positions in (3, 1):  # a prompt slice (fbgemm, per-row mapping) and a decode step (int8 x bf16)
                x = torch.randn(rows, positions, 96) * torch.linspace(0.1, 4.0, rows).view(rows, 1, 1)
                for a, b in zip(packed(x), separate(x)):
                    assert torch.equal(a, b)
    attention = serving_generator.model.model.layers[0].self_attn
    q, v = (getattr(m, "base", m) for m in (attention.q_proj, attention.v_proj))  # under a LoRA wrapper once adapted
    assert q.group is v.group


@pytest.mark.parametrize("which", ["int8", "none"])
def test_lean_decode_step_gives_the_same_bits_as_the_model_forward(which, serving_generator, fp32_generator):
    """The engine's decode step (serving.generation.llama_step) and the model's own forward give the same
    logits, bit for bit: one row alone, and three left-padded rows of different lengths with different
    adapters (one with none) over several steps."""
    import torch
    import torch.nn.functional as F

    gen = serving_generator if which == "int8" else fp32_generator
    assert gen._lean_steps
    keys = [gen.load_adapter(a).key if a else "__base__" for _, a in CASES[:3]]
    prompts = [gen.render(m) for m, _ in CASES[:3]]
    layers = gen.model.config.num_hidden_layers
    with torch.inference_mode(), gen._lock:
        caches, tokens = [], []
        for ids, key in zip(prompts, keys):
            cache = gen._new_cache(capacity=len(ids) + 8)
            tokens.append(int(gen._forward(torch.tensor([ids]), cache, [key])[0].argmax()))
            caches.append(cache)
        for rows in (1, 3):
            width = max(len(ids) for ids in prompts[:rows])
            twins = [gen._new_cache([[(c.layers[i].keys, c.layers[i].values) for c in caches[:rows]] for i in range(layers)],
                                    width + 8) for _ in range(2)]
            mask = torch.cat([F.pad(torch.ones((1, len(ids)), dtype=torch.long), (width - len(ids), 0))
                              for ids in prompts[:rows]])
            lengths, step_tokens = [len(ids) for ids in prompts[:rows]], tokens[:rows]
            for _ in range(4):
                mask = torch.cat([mask, torch.ones((rows, 1), dtype=torch.long)], dim=1)
                positions = torch.tensor([[n] for n in lengths])
                ids = torch.tensor([[t] for t in step_tokens])
                out = []
                for lean, cache in zip((True, False), twins):
                    gen._lean_steps = lean
                    try:
                        out.append(gen._forward(ids, cache, keys[:rows], mask if rows > 1 else None, positions))
                    finally:
                        gen._lean_steps = True
                assert torch.equal(out[0], out[1]), (which, rows)
                lengths = [n + 1 for n in lengths]
                step_tokens = out[0].argmax(dim=-1).tolist()


def test_int8_decode_step_rows_do_not_depend_on_their_neighbours(serving_generator):
    """A decode step (one position per row) multiplies the int8 weights with bf16 activations: each row's
    output is the same bits alone and in batches of 2-8 rows, and near the fp32 layer's; a prompt slice
    (several positions) keeps the per-row mapped fbgemm path; the served model's block layers carry the
    decode weights and its output head does not."""
    import torch
    from torch import nn

    from serving.generation import int8

    torch.manual_seed(1)
    linear = nn.Linear(192, 320)
    layer = nn.Sequential(linear)
    int8.quantize_int8(layer)
    layer = layer[0]
    x = torch.randn(8, 1, 192) * torch.linspace(0.05, 6.0, 8).view(8, 1, 1)
    with torch.inference_mode():
        alone = [layer(x[i:i + 1]) for i in range(8)]
        for rows in (2, 3, 8):
            together = layer(x[:rows])
            assert all(torch.equal(together[i:i + 1], alone[i]) for i in range(rows))
        exact = linear(x)
        error = (torch.cat(alone) - exact).abs().max() / exact.abs().max()
        assert 0 < error < 0.02, error
        assert layer.weight_int8.dtype == torch.int8 and layer.weight_int8.shape == (320, 192)
        slices = layer(x.view(1, 8, 192))  # one row of 8 positions: the mapped path, not the decode path
        assert not torch.equal(slices.view(8, 1, 320), torch.cat(alone))
        assert (slices.view(8, 1, 320) - exact).abs().max() / exact.abs().max() < 0.05
    model = serving_generator.model
    mlp = model.model.layers[0].mlp
    assert getattr(mlp.down_proj, "base", mlp.down_proj).weight_int8 is not None
    assert model.get_output_embeddings().weight_int8 is None  # the head: fbgemm (faster for 49k columns)


def test_bf16_prefill_is_closer_to_fp32_and_keeps_its_own_prefix_cache(bf16_generator, fp32_generator):
    """The prompt multiplied in bf16 (decode steps stay int8): its last-position logits are nearer the fp32
    model's than the int8 prefill's, and the system prompt's cached KV is kept per precision."""
    import torch

    gen = bf16_generator
    for messages, _ in CASES[:3]:
        ids = torch.tensor([gen.render(messages)])
        with torch.inference_mode():
            reference = fp32_generator._forward(ids, fp32_generator._new_cache(), ["__base__"])
            errors = {bf16: float((gen._forward(ids, gen._new_cache(), ["__base__"], bf16=bf16) - reference).abs().mean())
                      for bf16 in (False, True)}
        assert 0 < errors[True] < errors[False], errors
    assert gen.prefill_precision(True) == "bf16" and gen.prefill_precision(False) == "int8"
    assert fp32_generator.prefill_precision(True) == "fp32"  # no int8 layers: nothing to switch

    system = {"role": "system", "content": SYSTEM["content"] + " Quote the sources where you can, and say when they "
                                                                 "do not hold the answer."}
    messages = [system, {"role": "user", "content": "Why do heat pumps defrost in winter?"}]
    gen.engine._prefixes.clear()
    first = [gen.stream(messages, None, params(prefill_bf16=bf16)).text() for bf16 in (False, True)]
    assert {key[1] for key in gen.engine._prefixes} == {False, True}  # one entry per precision, not one shared
    gen.engine._prefixes.clear()
    second = [gen.stream(messages, None, params(prefill_bf16=bf16)).text() for bf16 in (True, False)]
    assert first == second[::-1]


def test_roomy_kv_cache_appends_in_place_and_equals_concatenation():
    """The engine's KV cache writes decode steps into spare room (no copy of the whole cache per step) and
    holds exactly what concatenation would; it grows when full and adopts keys set from outside."""
    import torch

    from serving.generation.kvcache import RoomyCache, RoomyLayer

    torch.manual_seed(0)
    layer, keys, values = RoomyLayer(capacity=6), [], []
    pointers = []
    for n in (4, 1, 1, 1):  # the fourth update overflows the 6 positions
        k, v = torch.randn(2, 3, n, 4), torch.randn(2, 3, n, 4)
        keys.append(k), values.append(v)
        got_k, got_v = layer.update(k, v)
        assert torch.equal(got_k, torch.cat(keys, dim=-2)) and torch.equal(got_v, torch.cat(values, dim=-2))
        assert layer.get_seq_length() == sum(x.shape[-2] for x in keys)
        pointers.append(got_k.data_ptr())
    assert pointers[0] == pointers[1] == pointers[2] != pointers[3]  # in place until full, then one regrowth
    layer.keys, layer.values = layer.keys[:, :, :3].clone(), layer.values[:, :, :3].clone()  # as crop() does
    k, v = torch.randn(2, 3, 1, 4), torch.randn(2, 3, 1, 4)
    got_k, _ = layer.update(k, v)
    assert torch.equal(got_k, torch.cat([torch.cat(keys, dim=-2)[:, :, :3], k], dim=-2))

    source = [(torch.randn(1, 3, 5, 4), torch.randn(1, 3, 5, 4)) for _ in range(2)]
    cache = RoomyCache(2, [[kv] for kv in source], capacity=9)
    kept = source[0][0].clone()
    source[0][0].zero_()  # the cache holds a copy: the stored prefix entry it came from may be reused
    assert torch.equal(cache.layers[0].keys, kept) and cache.get_seq_length() == 5
    cache.update(torch.randn(1, 3, 1, 4), torch.randn(1, 3, 1, 4), 0)
    assert cache.layers[0]._room[0].shape[-2] == 9 and cache.layers[0].keys.shape[-2] == 6

    # blocks of rows (a batch and a joining row) stacked and left-padded with zeros to the longer, as the
    # engine merges (one copy of each block)
    batch, joining = (torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)), (torch.randn(1, 3, 6, 4), torch.randn(1, 3, 6, 4))
    cache = RoomyCache(1, [[batch, joining]], capacity=10)
    layer = cache.layers[0]
    for got, b, j in zip((layer.keys, layer.values), batch, joining):
        assert torch.equal(got, torch.cat([torch.nn.functional.pad(b, (0, 0, 2, 0)), j]))
    assert layer._room[0].shape[-2] == 10 and layer.keys.data_ptr() == layer._room[0].data_ptr()
    cache.update(torch.randn(3, 3, 1, 4), torch.randn(3, 3, 1, 4), 0)
    assert layer.keys.shape[-2] == 7 and layer.keys.data_ptr() == layer._room[0].data_ptr()  # appended in place


def test_engine_stops_cleanly_at_exit_and_restarts_on_demand(serving_home, serving_generator, tmp_path):
    """The engine thread is ended at interpreter exit: torn down as a daemon inside torch's thread pools it
    aborted the process (exit status 134) in most short runs. ``stop()`` ends it; the next request restarts it."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = tmp_path / "ask_and_exit.py"
    script.write_text(
        "from serving.generation import GenerationParams, LocalGenerator\n"
        "import sys\n"
        "g = LocalGenerator('smollm2-135m-instruct', sys.argv[1], quantize='int8')\n"
        "print(g.stream([{'role': 'user', 'content': 'Name a colour.'}], params=GenerationParams(max_new_tokens=3)).text())\n",
        encoding="utf-8")
    repo = Path(__file__).resolve().parents[1]
    for _ in range(3):
        done = subprocess.run([sys.executable, str(script), str(serving_home)], cwd=repo, capture_output=True, text=True, timeout=300,
                              env={**os.environ, "PYTHONPATH": str(repo)})
        assert done.returncode == 0, done.stderr[-2000:]
        assert "terminate called" not in done.stderr

    gen = serving_generator
    before = gen.stream(CASES[0][0], None, params()).text()
    gen.engine.stop()
    assert not gen.engine._thread.is_alive()
    assert gen.stream(CASES[0][0], None, params()).text() == before

    # a request in the batch when the engine stops ends with an error naming why: its reader never waits forever
    running = gen.stream(CASES[3][0], None, params(max_new_tokens=200))
    assert next(running)
    gen.engine.stop()
    with pytest.raises(ServingError, match="the engine was stopped before this answer finished"):
        "".join(running)
    left = gen.engine.stats()
    assert (left["waiting"], left["prefilling"], left["running"], left["rows"]) == (0, 0, 0, 0)
    assert gen.stream(CASES[0][0], None, params()).text() == before  # and the next request starts it again
