"""Shared by the GPU benchmarks: the random 7B-shape model, an exact word-level tokenizer, the workload,
and measuring helpers (device sync timing, peak VRAM sampled through NVML, a share of the SMs through green
contexts)."""

import contextlib
import ctypes
import json
import random
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

VOCAB_SIZE = 32000
SPECIALS = {"<unk>": 0, "<s>": 1, "</s>": 2}
GIB = 1024**3


@dataclass(frozen=True)
class Req:
    custom_id: str
    prompt_ids: list[int]
    max_tokens: int

    @property
    def prompt(self) -> str:
        return " ".join(f"w{t}" for t in self.prompt_ids)


def workload(num_requests: int = 2048, seed: int = 0, prompt_len: tuple[int, int] = (32, 512),
             max_tokens: tuple[int, int] = (32, 256)) -> list[Req]:
    """Fixed-seed requests; word ids are token ids, so a prompt of n words is exactly n tokens."""
    rng = random.Random(seed)
    reqs = []
    for i in range(num_requests):
        n = rng.randint(*prompt_len)
        ids = [rng.randrange(len(SPECIALS), VOCAB_SIZE) for _ in range(n)]
        reqs.append(Req(f"r{i}", ids, rng.randint(*max_tokens)))
    return reqs


def write_tokenizer(out: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = dict(SPECIALS)
    vocab.update({f"w{i}": i for i in range(len(SPECIALS), VOCAB_SIZE)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                 pad_token="<unk>")
    hf.save_pretrained(out)


def build_llama7b(out: Path, *, vocab_size: int = VOCAB_SIZE,
                  write_tok: Callable[[Path], None] = write_tokenizer) -> dict:
    """Llama-2-7B config, random fp16 weights initialised on the GPU, saved once (skipped if present).
    vocab_size and write_tok: another tokenizer (ids 1 and 2 stay BOS and EOS)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if (out / "config.json").exists() and (out / "tokenizer.json").exists():
        return {"build_s": 0.0, "cached": True}
    start = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
                         rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                         tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(config).to(torch.float16)
    model.generation_config.pad_token_id = 0
    model.save_pretrained(out)
    write_tok(out)
    del model
    torch.cuda.empty_cache()
    return {"build_s": round(time.perf_counter() - start, 1), "cached": False}


def copy_bandwidth(device: str = "cuda", num_bytes: int = 2**32, iters: int = 20, rounds: int = 5) -> dict:
    """The device's memory bandwidth as a large device-to-device copy moves it (bytes read + written per second):
    the bus rate a memory-bound bound is computed from, measured in the run that reports against it. The fastest of
    rounds × iters copies: one round can read low (clocks still settling after a model build; docs/benchmarks.md,
    "The keys on the tiles' rows"), and a low reading flatters every efficiency measured against it."""
    import torch

    on_gpu = torch.device(device).type == "cuda"
    buffers = [torch.ones(num_bytes, dtype=torch.uint8, device=device), torch.empty(num_bytes, dtype=torch.uint8,
                                                                                       device=device)]

    def copies(n: int) -> None:
        for _ in range(n):
            buffers[1].copy_(buffers[0])
        if on_gpu:
            torch.cuda.synchronize(device)

    copies(1)
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        copies(iters)
        times.append((time.perf_counter() - start) / iters)
    seconds = min(times)
    buffers.clear()
    if on_gpu:
        torch.cuda.empty_cache()  # give the 2 × num_bytes back: a worker started after this sizes its KV from free memory
    return {"copy_bytes": num_bytes, "ms": round(1000 * seconds, 3), "gb_s": round(2 * num_bytes / seconds / 1e9, 1),
            "rounds_gb_s": [round(2 * num_bytes / t / 1e9, 1) for t in times],
            "note": f"device-to-device copy, bytes read + written; the fastest of {rounds} rounds of {iters}"}


def sync() -> None:
    import torch

    torch.cuda.synchronize()


class PeakVram:
    """Samples the GPU's used memory (NVML: every process on the card) in a thread; .peak_bytes."""

    def __init__(self, interval_s: float = 0.05):
        import pynvml

        pynvml.nvmlInit()
        self._nvml = pynvml
        self._handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        self.total_bytes = pynvml.nvmlDeviceGetMemoryInfo(self._handle).total
        self.interval_s = interval_s
        self.peak_bytes = 0
        self.peak_by_pid: dict[int, int] = {}  # each process's own peak: a stray process on the card shows here
        self.util_samples: list[int] = []  # NVML "GPU busy" percent: a kernel was running during the sample
        # the SM clock, the board's power and whether a power or thermal limit held the clock down: a long
        # tensor-core phase (a bulk run's prefills) may run at a lower clock than a short profile's
        self.clock_samples: list[tuple[int, float, int]] = []  # (SM MHz, watts, clock-event reason bits)
        self.max_sm_mhz = pynvml.nvmlDeviceGetMaxClockInfo(self._handle, pynvml.NVML_CLOCK_SM)
        self._reasons = getattr(pynvml, "nvmlDeviceGetCurrentClocksEventReasons", None) or getattr(
            pynvml, "nvmlDeviceGetCurrentClocksThrottleReasons", lambda handle: 0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def used(self) -> int:
        return self._nvml.nvmlDeviceGetMemoryInfo(self._handle).used

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak_bytes = max(self.peak_bytes, self.used())
            try:
                for proc in self._nvml.nvmlDeviceGetComputeRunningProcesses(self._handle):
                    used = proc.usedGpuMemory or 0
                    self.peak_by_pid[proc.pid] = max(self.peak_by_pid.get(proc.pid, 0), used)
            except self._nvml.NVMLError:  # not every driver or container reports processes
                pass
            self.util_samples.append(self._nvml.nvmlDeviceGetUtilizationRates(self._handle).gpu)
            with contextlib.suppress(self._nvml.NVMLError):  # a driver that reports none of them: no clock figures
                self.clock_samples.append((self._nvml.nvmlDeviceGetClockInfo(self._handle, self._nvml.NVML_CLOCK_SM),
                                           self._nvml.nvmlDeviceGetPowerUsage(self._handle) / 1000.0,
                                           self._reasons(self._handle)))
            time.sleep(self.interval_s)

    def clocks(self, since: int = 0) -> dict | None:
        """The SM clock and power over the samples from index `since` (len(clock_samples) when a phase began):
        mean and lowest MHz against the card's maximum, mean watts, and the share of samples a power cap
        (software 0x4, hardware brake 0x80) or a thermal limit (0x20, 0x40) or hardware slowdown (0x8) held."""
        samples = self.clock_samples[since:]
        if not samples:
            return None
        mhz = [m for m, _, _ in samples]

        def share(bits: int) -> float:
            return round(sum(1 for _, _, r in samples if r & bits) / len(samples), 3)
        return {"sm_mhz_mean": round(sum(mhz) / len(mhz)), "sm_mhz_min": min(mhz), "sm_mhz_max_card": self.max_sm_mhz,
                "power_w_mean": round(sum(w for _, w, _ in samples) / len(samples), 1),
                "power_w_max": round(max(w for _, w, _ in samples), 1), "power_capped": share(0x4 | 0x80),
                "thermal": share(0x20 | 0x40), "hw_slowdown": share(0x8), "samples": len(samples)}

    @property
    def busy_fraction(self) -> float | None:
        return round(sum(self.util_samples) / (100 * len(self.util_samples)), 3) if self.util_samples else None

    def __enter__(self) -> "PeakVram":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def stop_process(proc, timeout_s: float) -> None:
    """SIGTERM (a worker finishes or requeues its in-flight requests), then SIGKILL after timeout_s."""
    import signal
    import subprocess

    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, default=lambda o: asdict(o) if hasattr(o, "__dataclass_fields__")
                               else str(o)) + "\n")


SM_RESOURCE = 1  # CU_DEV_RESOURCE_TYPE_SM
RESOURCE_BYTES = 1024  # more than sizeof(CUdevResource) in the CUDA 12.4+ and 13 headers
SM_COUNT_AT = 96  # CUdevResource: its type (4 bytes), 92 bytes of padding, then the SM resource, smCount first
GREEN_CTX_DEFAULT_STREAM = 1
STREAM_NON_BLOCKING = 1  # what a green context's streams must be


class GreenSplit:
    """The device's SMs cut in two disjoint green contexts (about `sms` of them and the rest), a stream in each."""

    def __init__(self, sms: int, device: int = 0):
        import torch

        self._cuda = ctypes.CDLL("libcuda.so.1")
        dev = ctypes.c_int()
        self._call("cuDeviceGet", ctypes.byref(dev), device)
        whole = ctypes.create_string_buffer(RESOURCE_BYTES)
        self._call("cuDeviceGetDevResource", dev, whole, SM_RESOURCE)
        group, rest = ctypes.create_string_buffer(RESOURCE_BYTES), ctypes.create_string_buffer(RESOURCE_BYTES)
        self._call("cuDevSmResourceSplitByCount", group, ctypes.byref(ctypes.c_uint(1)), whole, rest, 0, sms)
        self.streams, self.sms = [], []
        for resource in (group, rest):
            desc, ctx, stream = ctypes.c_void_p(), ctypes.c_void_p(), ctypes.c_void_p()
            self._call("cuDevResourceGenerateDesc", ctypes.byref(desc), resource, 1)
            self._call("cuGreenCtxCreate", ctypes.byref(ctx), desc, dev, GREEN_CTX_DEFAULT_STREAM)
            self._call("cuGreenCtxStreamCreate", ctypes.byref(stream), ctx, STREAM_NON_BLOCKING, 0)
            self.streams.append(torch.cuda.ExternalStream(stream.value, device=device))
            self.sms.append(struct.unpack_from("I", resource, SM_COUNT_AT)[0])

    def _call(self, name: str, *args) -> None:
        code = getattr(self._cuda, name)(*args)
        if code:
            raise RuntimeError(f"{name}: CUresult {code}")
