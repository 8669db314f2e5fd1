#!/usr/bin/env bash
# The GPU measurements pending since the last run, as stages that each fit one device call (10 min): every command
# runs under its own timeout so that the results of the others come back, all under $OUT/round, tarred at the end.
#   source scripts/device-setup.sh && bash scripts/gpu-round.sh tune     # int8_tune, then bulk with its table
#   source scripts/device-setup.sh && bash scripts/gpu-round.sh ab       # bulk: no table; table + mixed steps;
#                                                                        # table + static compile shapes
#   source scripts/device-setup.sh && bash scripts/gpu-round.sh combined # bulk: table + static shapes ± mixed steps
#   source scripts/device-setup.sh && bash scripts/gpu-round.sh bloom-prep  # tune BLOOM-7b1's shapes; bulk; profile
#   WHEELS=.whl-peer source scripts/device-setup.sh && bash scripts/gpu-round.sh bloom  # right after: BLOOM-7b1
#                                                                        # against HF int8
#   source scripts/device-setup.sh && bash scripts/gpu-round.sh verify   # the defaults ±overlapped prefill; profile
#   source scripts/device-setup.sh && bash scripts/gpu-round.sh again    # fp8 KV; the same A/B once more, other order
#   source scripts/device-setup.sh && bash scripts/gpu-round.sh profile-bulk  # decode at the bulk run's mean state
#   source scripts/device-setup.sh && bash scripts/gpu-round.sh kernels  # decode attention, fp16 and fp8 K/V
#   source scripts/device-setup.sh && bash scripts/gpu-round.sh retune   # int8_tune's GEMMs with the wider tiles
#   source scripts/device-setup.sh && bash scripts/gpu-round.sh rows     # int8_tune at 384 rows; bulk with, without
#   source scripts/device-setup.sh && bash scripts/gpu-round.sh next     # bulk fp16 and fp8 K/V: one-split
#                                                                        # attention, the fp8 store, StepClock
#   source scripts/device-setup.sh && bash scripts/gpu-round.sh next-profile  # profiles at the bulk state
#   source scripts/device-setup.sh && bash scripts/gpu-round.sh retune-tma  # int8_tune with the TMA kernel; bulk
#   source scripts/device-setup.sh && bash scripts/gpu-round.sh prefill  # bulk at 4,096/8,192/16,384 prefill tokens
#   PREFILL=N source scripts/device-setup.sh && bash scripts/gpu-round.sh same-run  # fp8 K/V; HF baselines
#   source scripts/device-setup.sh && bash scripts/gpu-round.sh rope     # bulk (clocks sampled) and profile
#   source scripts/device-setup.sh && bash scripts/gpu-round.sh dense    # default vs int_mm with planted outliers
#   source scripts/device-setup.sh && bash scripts/gpu-round.sh groups   # per-group activation scales' GEMM cost
#   source scripts/device-setup.sh && bash scripts/gpu-round.sh prefill-run  # strided v; a long prefill's clock
#   source scripts/device-setup.sh && bash scripts/gpu-round.sh workload  # the bulk workload in-process; bulk
#   source scripts/device-setup.sh && bash scripts/gpu-round.sh trace    # the workload in-process, step by step
#   source scripts/device-setup.sh && bash scripts/gpu-round.sh cold     # the workload's first run and its second
#   source scripts/device-setup.sh && bash scripts/gpu-round.sh warm     # with the engine's warm-up: bulk; cold
#   source scripts/device-setup.sh && bash scripts/gpu-round.sh rotate   # --int8-rotate down: quality, speed
#   source scripts/device-setup.sh && bash scripts/gpu-round.sh defaults-twice  # bulk on the defaults, twice
#   source scripts/device-setup.sh && bash scripts/gpu-round.sh baselines  # HF's baselines
#   source scripts/device-setup.sh && bash scripts/gpu-round.sh same-machine  # bulk, then HF's baselines
#   source scripts/device-setup.sh && bash scripts/gpu-round.sh int8kv  # bulk: int8 K/V, the defaults
#   source scripts/device-setup.sh && bash scripts/gpu-round.sh int8kv-ab  # HF's baselines; bulk int8 again
#   source scripts/device-setup.sh && bash scripts/gpu-round.sh int8kv-quality  # int8 K/V: drift, kernel
#   source scripts/device-setup.sh && bash scripts/gpu-round.sh int8kv-final  # after int8kv: HF's baselines; drift
#   source scripts/device-setup.sh && bash scripts/gpu-round.sh int8kv-fast  # int8 K/V's fp16 path: kernel, bulk
#   source scripts/device-setup.sh && bash scripts/gpu-round.sh int8kv-fast-final  # its drift; HF; profile
#   source scripts/device-setup.sh && bash scripts/gpu-round.sh int8kv-paged  # int8 K/V, several blocks a step
#   source scripts/device-setup.sh && bash scripts/gpu-round.sh int8kv-issue  # kernels; bulk int8 v-bias, defaults
#   source scripts/device-setup.sh && bash scripts/gpu-round.sh int8kv-issue-2  # then: int8 v, 1,536 rows, profile
#   source scripts/device-setup.sh && bash scripts/gpu-round.sh tune-int8kv  # GEMV and 640-row GEMM table; bulk int8
#   source scripts/device-setup.sh && bash scripts/gpu-round.sh int8kv-early  # int8 tiles converted where loaded
#   source scripts/device-setup.sh && bash scripts/gpu-round.sh int8kv-kernel  # int8 K/V, V scales in p; kernels
#   source scripts/device-setup.sh && bash scripts/gpu-round.sh small-vram-int8  # 13B under 6 GiB: the streamed
#                                                                        # outlier kernel against int_mm
#   source scripts/device-setup.sh && bash scripts/gpu-round.sh fp8v  # fp8v K/V: its drift; bulk against fp16, fp8
#   source scripts/device-setup.sh && bash scripts/gpu-round.sh rotate-bulk  # the default, rotated, int_mm: bulk
#   source scripts/device-setup.sh && bash scripts/gpu-round.sh alloc    # the workload in-process: allocator
#   source scripts/device-setup.sh && bash scripts/gpu-round.sh int8-bulk  # bulk: the default against int_mm
#   WHEELS=.whl-bloom source scripts/device-setup.sh && bash scripts/gpu-round.sh models-check  # BLOOM-7b1, BLOOM-13B
#   OLD=../.old source scripts/device-setup.sh && bash scripts/gpu-round.sh regress  # defaults: this tree, OLD's
#   OLD=../.old source scripts/device-setup.sh && bash scripts/gpu-round.sh claims  # this tree, OLD's, again; HF's
#   OLD=../.old source scripts/device-setup.sh && bash scripts/gpu-round.sh claims-ab  # this tree, then OLD's
#   source scripts/device-setup.sh && bash scripts/gpu-round.sh fixed  # #22's table: bulk, HF's baselines
#   source scripts/device-setup.sh && bash scripts/gpu-round.sh final  # int8_tune at 384 rows; bulk; HF's baselines
#   source scripts/device-setup.sh && bash scripts/gpu-round.sh final-2  # then: bulk, committed tables and final's
#   OLD=../.old source scripts/device-setup.sh && bash scripts/gpu-round.sh fused-norm  # this tree, then OLD's
#   OLD=../.old source scripts/device-setup.sh && bash scripts/gpu-round.sh gated  # the MLP tail's kernel; bulk
#                                                                        # this tree, then OLD's
#   source scripts/device-setup.sh && bash scripts/gpu-round.sh gated-final  # its launches; bulk; HF's baselines
#   source scripts/device-setup.sh && bash scripts/gpu-round.sh card     # H200: bulk, HF's baselines, gated; else prefill's
#                                                                        # GEMM rows tuned, rope_store, bulk
#   source scripts/device-setup.sh && bash scripts/gpu-round.sh probe    # int8 K/V's bytes through the fp16
#                                                                        # kernel; a decode step's profile
#   source scripts/device-setup.sh && bash scripts/gpu-round.sh confirm  # H200: bulk, HF's baselines; the GEMM at
#                                                                        # 448/512 rows, bulk with it; bulk int8 q8
#   source scripts/device-setup.sh && bash scripts/gpu-round.sh ratio    # H200: idle; HF x3, bulk x2, HF x3, bulk
#   source scripts/device-setup.sh && bash scripts/gpu-round.sh q16      # int8 K/V, q16: launches; bulk; defaults
#   Q16="64, 2, 3" source scripts/device-setup.sh && bash scripts/gpu-round.sh q16-ab  # then: HF; drift; bulk q16
#   source scripts/device-setup.sh && bash scripts/gpu-round.sh int8-default  # q16 launches; bulk; HF; bulk; exact
#   OLD=../.old source scripts/device-setup.sh && bash scripts/gpu-round.sh step  # keys kernel: this tree's
#                                                                        # launches, OLD's; bulk; OLD's bulk; HF's
#                                                                        # baseline; bulk again
#   source scripts/device-setup.sh && bash scripts/gpu-round.sh partition  # attention beside the projections
#                                                                        # on disjoint SMs (green contexts)
#   source scripts/device-setup.sh && bash scripts/gpu-round.sh profile  # profile_steps without and with the table
#   source scripts/device-setup.sh && bash scripts/gpu-round.sh vt       # V^T: bulk against the defaults; vt_keys;
#                                                                        # HF's baseline (H200); the drift
#   source scripts/device-setup.sh && bash scripts/gpu-round.sh vt-short # V^T: vt_keys, then the two bulks
#   source scripts/device-setup.sh && bash scripts/gpu-round.sh state614 # a step at 614 rows profiled, V^T and
#                                                                        # keys; the GEMM searched at 640 rows
#   source scripts/device-setup.sh && bash scripts/gpu-round.sh rows-tune # the GEMM at 576-704 rows; a step at 614
#   source scripts/device-setup.sh && bash scripts/gpu-round.sh h200     # #22's table in one call (else rows-tune)
#   OLD=../.old source scripts/device-setup.sh && bash scripts/gpu-round.sh fuse-ab  # a step at 614 rows; bulk
#                                                                        # this tree, OLD's, this tree
#   source scripts/device-setup.sh && bash scripts/gpu-round.sh vt-rope  # V^T stored by rope_store: a step; bulk
#   source scripts/device-setup.sh && bash scripts/gpu-round.sh vt-garbage  # V^T's outlier columns: the first
#                                                                        # step leaving unsound K/V blocks (kv_faults),
#                                                                        # V^T and keys on every SM; V^T under MPS
#   source scripts/device-setup.sh && bash scripts/gpu-round.sh vt-sites-short  # after vt-garbage: where the
#                                                                        # faults are (fault_sites), V^T; under MPS
#   source scripts/device-setup.sh && bash scripts/gpu-round.sh vt-mps-trace  # V^T's NaNs under MPS: the first
#                                                                        # prefill layer by layer; keys; V^T every SM
# The table `tune` writes lands in $OUT/round/tuned/ (and is used by that call's profile); $OUT is new in every call,
# so commit it as worker/engine/kernels/tuned/<device>.json before `ab` and `profile`, which read it from the checkout.
set -u
stage="${1:?stage: tune, ab or profile}"
out="${OUT:?run on the device machine}/round"
tables=worker/engine/kernels/tuned  # where the engine reads the table (kernels/tuned.py)
mkdir -p "$out/tuned" "$tables"
log() { echo "[$(date +%T)] $*" | tee -a "$out/round.log"; }
run() {  # run SECONDS NAME CMD...: output to NAME.log, its exit status in round.log
    local limit=$1 name=$2
    shift 2
    log "start $name: $*"
    timeout "$limit" "$@" > "$out/$name.log" 2>&1
    local rc=$?
    # int8 inputs whose outlier slots ran out: a healthy run has none; hundreds of new columns an input mean garbage
    log "end $name: exit $rc; int8 inputs full: $(grep -c 'found no free slot' "$out/$name.log")"
    tar czf "$OUT/round-$stage.tgz" -C "$OUT" round  # what ran so far comes back if the call is cut
}
profile() {  # profile NAME ENGINE_OPTIONS [PROFILE_STEPS OPTIONS...]
    local name=$1 options=$2
    shift 2
    run "${PROFILE_S:-130}" "profile_$name" python3 -m benchmarks.profile_steps --models llama7b --steps 16 --out "$out/profile_$name" \
        --engine-options "$options" "$@"
}

bulk() {  # bulk NAME TUNED_KERNELS COMPILE_SHAPES MIXED_STEPS [OVERLAP_PREFILL (default 1) [KV_CACHE_DTYPE]]
    # PREFILL=N: N prompt tokens per prefill step (--max-prefill-tokens; unset: the engine's default); KV_SCALES=MODE:
    # --int8-kv-scales MODE (unset: the default)
    BATCHGEN_MAX_PREFILL_TOKENS=${PREFILL:-} BATCHGEN_COMPACT_ROWS=${COMPACT:-1} BATCHGEN_INT8_KV_SCALES=${KV_SCALES:-} \
    BATCHGEN_TUNED_KERNELS=$2 BATCHGEN_COMPILE_SHAPES=$3 BATCHGEN_MIXED_STEPS=$4 BATCHGEN_OVERLAP_PREFILL=${5:-1} \
        BATCHGEN_KV_CACHE_DTYPE=${6:-auto} run "${BULK_S:-190}" "bulk_$1" \
        python3 -m benchmarks.bulk --only batchgen --skip-512 --no-fit --agree-requests 0 --out "$out/bulk_$1"
}

hf_static() {  # hf_static NAME SECONDS [ARGS...]: HF fp16 static at 256 rows, #22's baseline (the most rows its
    # largest-fit search found: 288 do not fit on an H200), no int8 rows; ARGS go to benchmarks.bulk
    local name=$1 limit=$2
    shift 2
    run "$limit" "$name" python3 -m benchmarks.bulk --only baselines --no-int8-rows --fp16 256:static \
        --no-fp16-largest --out "$out/$name" "$@"
}

q16_launch() {  # q16_launch "BLOCK_N, WARPS, STAGES": INT8_QK_LAUNCHES[2] of this copy set to it (empty: as committed)
    [ -n "$1" ] || return 0
    sed -i -E "s/^(INT8_QK_LAUNCHES = \{1: \([0-9, ]+\), 2: )\([0-9, ]+\)\}/\1($1)}/" \
        worker/engine/kernels/attention.py
    log "q16 launch: $(grep '^INT8_QK_LAUNCHES' worker/engine/kernels/attention.py)"
}

state_kernels() {  # state_kernels NAME SECONDS MATCH: the decode kernels MATCH names at the int8 bulk state
    run "$2" "$1" python3 -m benchmarks.kernels --only bandwidth,attention --rows 614 --mean-ctx 360 --max-len 768 \
        --out "$out/$1" --match "$3"
}

default_kernels() {  # the int8 cache's decode kernels at their default launches (fp16's beside them) at the
    # int8 bulk state
    state_kernels kernels 60 \
        'paged fp16, the default launch|q16 early, block_n 64, warps 2, stages 3|keys, block_n 32, warps 1, stages 4'
}

partition() {  # benchmarks.partition at the int8 bulk state: 614 rows, half a side
    run "${PARTITION_S:-150}" partition python3 -m benchmarks.partition --rows 614 --mean-ctx 360 --max-len 768 \
        --out "$out/partition"
}

keys_launch() {  # keys_launch "BLOCK_N, WARPS, STAGES": KEYS_LAUNCH of this copy set to it (empty: as committed)
    [ -n "$1" ] || return 0
    sed -i -E "s/^KEYS_LAUNCH = \([0-9, ]+\)/KEYS_LAUNCH = ($1)/" worker/engine/kernels/attention.py
    log "keys launch: $(grep '^KEYS_LAUNCH' worker/engine/kernels/attention.py)"
}

in_old() {  # in_old CMD...: CMD in OLD's tree (an earlier commit), its own batchgen.* and benchmarks importable
    local old
    old=$(cd "${OLD:?OLD=<tree of the earlier commit>}" && pwd)
    mkdir -p "$old/.devpkg/batchgen"
    for part in jobs producer worker; do ln -sfn "$old/$part" "$old/.devpkg/batchgen/$part"; done
    (cd "$old" && export PYTHONPATH="/tmp/site:$old/.devpkg:$old" && "$@")
}

keys_ab() {  # int8_keys' launches at the int8 bulk state, then OLD's tree's (the commit before) at two of them
    state_kernels kernels 100 'paged fp16, the default launch|keys|heads-major'
    in_old state_kernels kernels_old 60 \
        'paged fp16, the default launch|keys, block_n 32, warps 1, stages 4|keys, block_n 16, warps 1, stages 3'
}

on_h200() {  # whether this card is an H200
    nvidia-smi --query-gpu=name --format=csv,noheader | grep -q H200
}

gemm_rows() {  # gemm_rows SECONDS BUDGET: the GEMM at the decode buckets between the table's 512 and 1024 rows
    # (576, 640, 704), each search's start (this card's table before) timed beside its best; the tables with them in
    # use, and as used under $out/tables
    mkdir -p "$out/rows" "$out/tables" && cp "$tables"/NVIDIA*.json "$out/rows/"
    run "$1" int8_tune_rows python3 -m benchmarks.int8_tune --shapes llama7b --kernels gemm --rows 576,640,704 \
        --out "$out/rows/int8_tune.json" --budget-s "$2"
    cp "$out"/rows/NVIDIA*.json "$tables"/ && cp "$tables"/NVIDIA*.json "$out/tables/"
    log "table in use: $(ls "$tables")"
}

tune_rows() {  # tune_rows SECONDS BUDGET: gemm_rows, then the gated quantiser at those rows (gated_rows)
    gemm_rows "$1" "$2"
    gated_rows
}

gated_rows() {  # the MLP tail's quantiser at the decode buckets between 512 and 1,024 rows (the table has 256 and
    # 1,024), merged into the table in use; the tables as used come back under $out/tables
    run 120 gated_rows python3 -m benchmarks.gated --rows 640 --tune-rows 512,576,640,704 --table "$tables" \
        --out "$out/gated"
    mkdir -p "$out/tables" && cp "$tables"/NVIDIA*.json "$out/tables/"
}

agree() {  # agree A B: the share of requests whose texts two bulk runs (bulk_A, bulk_B) agree on, whole and in their
    # first 16/64/256 characters, into round.log
    log "agree $1 $2: $(python3 -c 'import json, sys
a, b = (json.load(open(f"{d}/batch_2048_digests.json")) for d in sys.argv[1:])
print(round(sum(a[k] == b.get(k) for k in a) / max(1, len(a)), 4), "of", len(a), end="; prefixes ")
a, b = (json.load(open(f"{d}/batch_2048_prefix_digests.json")) for d in sys.argv[1:])
print([round(sum(a[k][i] == b.get(k, [None] * 3)[i] for k in a) / max(1, len(a)), 4) for i in range(3)])' \
        "$out/bulk_$1" "$out/bulk_$2" 2>&1)"
}

vt_check() {  # V^T against the keys kernel through the engine's stores and decode steps at Llama-7B's heads
    run 90 vt_check python3 -m benchmarks.vt_check --out "$out"
}

vt_ab() {  # bulk on the defaults (builds the llama7b model, once per machine), then on V^T, and their agreement
    BULK_S=200 bulk defaults 1 static-features 0
    KV_SCALES=v-q16-keys-vt BULK_S=130 bulk vt 1 static-features 0
    agree defaults vt
}

start_mps() {  # every CUDA process after this under MPS with MPS_PCT (73) % of the SMs: ~96 of an H100's 132
    export CUDA_MPS_PIPE_DIRECTORY=/tmp/mps-pipe CUDA_MPS_LOG_DIRECTORY=/tmp/mps-log
    mkdir -p "$CUDA_MPS_PIPE_DIRECTORY" "$CUDA_MPS_LOG_DIRECTORY"
    if ! nvidia-cuda-mps-control -d; then log "MPS did not start"; exit 1; fi
    trap 'echo quit | nvidia-cuda-mps-control' EXIT
    export CUDA_MPS_ACTIVE_THREAD_PERCENTAGE=${MPS_PCT:-73}
    log "MPS at $CUDA_MPS_ACTIVE_THREAD_PERCENTAGE %"
}

stop_mps() {  # MPS's daemon quit: the processes after this get every SM again
    echo quit | nvidia-cuda-mps-control
    trap - EXIT
    unset CUDA_MPS_ACTIVE_THREAD_PERCENTAGE CUDA_MPS_PIPE_DIRECTORY CUDA_MPS_LOG_DIRECTORY
    log "MPS stopped"
}

bulk_old() {  # bulk on the defaults from OLD's tree, as bulk_old
    in_old bulk old 1 static-features 0
}

faults() {  # kv_faults: profile_steps' scenario at the bulk state, each step's K/V blocks checked (timeout, name,
    # --int8-kv-scales)
    run "$1" "kv_faults_$2" python3 -m benchmarks.kv_faults --out "$out/kv_faults_$2" \
        --engine-options "int8_kv_scales=$3" --rows 614 --prompt 352 --max-model-len 416 --steps 40
}

case "$stage" in
  tune)
    cp "$tables"/*.json "$out"/tuned/ 2>/dev/null  # int8_tune merges into the table it finds: the other shapes stay
    run 300 int8_tune python3 -m benchmarks.int8_tune --shapes llama7b --out "$out/tuned/int8_tune.json" \
        --budget-s 270
    cp "$out"/tuned/NVIDIA*.json "$tables"/ && log "table in use: $(ls "$tables")"
    bulk tuned 1 dynamic 0 0  # the llama7b model is built here, once per machine
    ;;
  ab)  # reads the table committed since `tune`
    bulk untuned 0 dynamic 0 0
    bulk mixed 1 dynamic 1 0
    bulk static 1 static-features 0 0
    ;;
  combined)  # the table with static compile shapes, mixed steps on and off; the profile of that engine
    bulk static_mixed 1 static-features 1 0
    profile static "tuned_kernels=1,compile_shapes=static-features"
    bulk static_again 1 static-features 0 0
    ;;
  bloom-prep)  # the BLOOM-7b1 shapes added to the committed table (kept in /tmp for `bloom`); bulk and profile
    cp "$tables"/NVIDIA*.json "$out/tuned/"
    run 150 int8_tune python3 -m benchmarks.int8_tune --shapes bloom7b1 --out "$out/tuned/int8_tune.json" \
        --budget-s 120
    cp "$out"/tuned/NVIDIA*.json "$tables"/ && mkdir -p /tmp/tuned && cp "$out"/tuned/NVIDIA*.json /tmp/tuned/
    bulk defaults 1 static-features 0 0
    profile defaults ""
    ;;
  bloom)  # on the machine `bloom-prep` set up, with .whl-peer carried and installed over it (WHEELS=.whl-peer):
    # transformers >= 5.24, which BLOOM's decode graphs need
    cp /tmp/tuned/NVIDIA*.json "$tables"/ 2>/dev/null || true
    run 400 models_bloom python3 -m benchmarks.models --out "$out/models" \
        --models bloom-7b1 --num-requests 256 --hf-batches 64,128,256
    ;;
  verify)  # the checkout's defaults (the guard recorded in the quantiser: the profile's decode kernels show it),
    # A/B overlapped prefill on the same machine, and the profile; `again` repeats the A/B (runs differ by a few %)
    bulk defaults 1 static-features 0 0
    bulk overlap_prefill 1 static-features 0 1
    profile defaults ""
    ;;
  again)  # and the fp8 KV cache's throughput (opt-in for its quality; never measured end to end): half the K/V
    # bytes a decode step reads, which are most of them at the bulk run's ~380 rows
    bulk fp8_kv 1 static-features 0 1 fp8
    bulk overlap_prefill_again 1 static-features 0 1
    bulk defaults_again 1 static-features 0 0
    ;;
  profile-bulk)  # a decode step as the bulk run's are on average (~384 rows, ~357 tokens of context: ~79 GB a step,
    # ~72 of it K/V), where stop 34's profile had 224 rows of 256-token prompts; fp8 K/V at the same state. Rows
    # reserve max_model_len (prompt + max_tokens) of paged K/V: 416 lets 384 rows in, as the bulk run's mix does
    profile bulk_state "" --rows 384 --prompt 352 --max-model-len 416
    profile bulk_state_fp8 "kv_cache_dtype=fp8" --rows 384 --prompt 352 --max-model-len 416
    ;;
  kernels)  # decode attention alone at the bulk run's mean state, each launch with fp16 and fp8 K/V (fp8 read 2.0-2.4
    # TB/s of its bytes, fp16 4.1)
    run 240 kernels python3 -m benchmarks.kernels --only bandwidth,attention --rows 384 --mean-ctx 357 --max-len 768 \
        --out "$out/kernels"
    ;;
  retune)  # the GEMM retune with tiles the coordinate steps could not reach before (fitted), kept apart
    run 300 int8_tune_retune python3 -m benchmarks.int8_tune --shapes llama7b --kernels gemm \
        --out "$out/retune/int8_tune.json" --budget-s 270
    ;;
  rows)  # the GEMM at the bulk run's decode batches: 384 rows (the table has 256 and 1024; 384's launch serves
    # 314-627 rows, where the bulk run's mean of 384 and max of 532 lie), each search started from the table's launch;
    # bulk with that table, then with the committed one on the same machine
    mkdir -p "$out/rows" && cp "$tables"/NVIDIA*.json "$out/rows/" && cp "$tables"/NVIDIA*.json /tmp/committed.json
    run 140 int8_tune_rows python3 -m benchmarks.int8_tune --shapes llama7b --kernels gemm --rows 384 \
        --out "$out/rows/int8_tune.json" --budget-s 115
    cp "$out"/rows/NVIDIA*.json "$tables"/ && log "table in use: $(ls "$tables")"
    BULK_S=225 bulk rows 1 static-features 0 0  # builds the llama7b model (once per machine)
    cp /tmp/committed.json "$tables"/NVIDIA_H200.json
    bulk committed 1 static-features 0 0
    ;;
  next)  # the levers CPU-tested after the 2026-12-04 run: row compaction (a simulation of the bulk workload's
    # scheduling computes 533 graph rows a decode step for 386 running; 413 with it), attention at one split
    # launching no merge (the profile's 0.30 ms), the fp8 cache quantised in the store's launch (the fp8 prefill's
    # ~8.5 ms of divide/clamp/cast/copy kernels), StepClock's device breakdown; against that day's rows
    BULK_S=225 bulk defaults 1 static-features 0  # builds the llama7b model (once per machine)
    BULK_S=160 COMPACT=0 bulk no_compact 1 static-features 0  # row compaction's A/B (the rows computed a step)
    BULK_S=160 bulk fp8_kv 1 static-features 0 1 fp8
    ;;
  next-profile)  # the step profiles at the bulk state, fp16 and fp8 K/V, and one with call sites (--stacks: which
    # ops make the host wait inside a step; a prefill's wall exceeded its kernels by ~23 ms)
    profile bulk_state "" --rows 384 --prompt 352 --max-model-len 416
    profile bulk_state_fp8 "kv_cache_dtype=fp8" --rows 384 --prompt 352 --max-model-len 416
    profile bulk_state_stacks "" --rows 384 --prompt 352 --max-model-len 416 --stacks
    ;;
  retune-tma)  # right after `next` on the same machine (its bulk is the baseline): the GEMM searched again at the bulk
    # run's decode (384) and prefill (4,096) rows and at 1,024, the persistent TMA-loading kernel among the choices
    mkdir -p "$out/retune_tma" && cp "$tables"/NVIDIA*.json "$out/retune_tma/"
    run 270 int8_tune_tma python3 -m benchmarks.int8_tune --shapes llama7b --kernels gemm --rows 384,1024,4096 \
        --out "$out/retune_tma/int8_tune.json" --budget-s 240
    cp "$out"/retune_tma/NVIDIA*.json "$tables"/ && log "table in use: $(ls "$tables")"
    BULK_S=225 bulk retuned_tma 1 static-features 0
    profile retuned_tma ""
    ;;
  prefill)  # the device's prefill time in the bulk run (84 ms a step of ~3,900 tokens, 12.1 s in all) exceeds a
    # profiled 4,096-token step's kernels (64-69 ms): fewer, longer prefill steps, against the defaults on the same
    # machine; and the bulk-state decode profile (its fill loop now waits for every row to be admitted)
    BULK_S=225 bulk defaults 1 static-features 0  # builds the llama7b model (once per machine)
    PREFILL=8192 BULK_S=160 bulk prefill_8192 1 static-features 0
    PREFILL=16384 BULK_S=160 bulk prefill_16384 1 static-features 0
    profile bulk_state "" --rows 384 --prompt 352 --max-model-len 416
    ;;
  same-run)  # right after `prefill` (PREFILL=the better budget): fp8 K/V with it, and HF's baselines in the same
    # machine's run: int8 bs 1 and 256, fp16 static at 256 and at the most rows that fit
    BULK_S=160 bulk fp8_kv 1 static-features 0 1 fp8
    run 360 baselines python3 -m benchmarks.bulk --only baselines --int8-bs 256 --fp16 256:static --out "$out/baselines"
    ;;
  rope)  # the Triton RoPE kernel (the compiled RoPE took 5.67 ms of a 64 ms 4,096-token prefill and 0.65 ms of a
    # 25.6 ms decode step at the bulk state): bulk with the SM clock and power sampled; the bulk-state profile
    BULK_S=210 bulk defaults 1 static-features 0  # builds the llama7b model (once per machine)
    profile bulk_state "" --rows 384 --prompt 352 --max-model-len 416
    ;;
  dense)  # #20's speed bounds with the default keeping columns at every input, as real models make it (the random
    # model keeps them at down_proj only): the dense product in the GEMM's epilogue against computed apart; then
    # without planted channels. The speed model is Llama-3-8B's shape: its GEMM launches are tuned first (the
    # committed table has Llama-2-7B's and BLOOM-7b1's), into $OUT/round/dense (commit the table if kept)
    mkdir -p "$out/dense" && cp "$tables"/NVIDIA*.json "$out/dense/"
    run 140 int8_tune_llama3 python3 -m benchmarks.int8_tune --shapes llama3_8b --kernels gemm --rows 256,4096 \
        --out "$out/dense/int8_tune.json" --budget-s 110
    cp "$out"/dense/NVIDIA*.json "$tables"/ && log "table in use: $(ls "$tables")"
    run 250 quality_speed_outliers python3 -m benchmarks.quality --device cuda --speed-only --speed-outliers 20 \
        --out "$out/quality_speed_outliers.json"
    run 170 quality_speed python3 -m benchmarks.quality --device cuda --speed-only --out "$out/quality_speed.json"
    ;;
  groups)  # #20: what a scale per group of 128 activation columns costs the int8 GEMM (benchmarks/int8_groups.py)
    run 300 int8_groups python3 -m benchmarks.int8_groups --out "$out/int8_groups.json"
    ;;
  prefill-run)  # #22: FlashAttention reads v strided (no copy); is a long prefill held by the power cap or the host?
    run 60 flash_strided python3 -c "
import torch
from batchgen.worker.engine.llama import flash_varlen
t, h, d = 4096, 32, 128
qkv = torch.randn(t, 3 * h * d, device='cuda', dtype=torch.float16)
q, k, v = (x.view(t, h, d) for x in qkv.split(h * d, dim=-1))
cu = torch.tensor([0, 1000, 2500, t], device='cuda', dtype=torch.int32)
a = flash_varlen(q.contiguous(), k.contiguous(), v.contiguous(), cu, cu, 1596, 1596, causal=True, scale=0.088)
b = flash_varlen(q, k, v, cu, cu, 1596, 1596, causal=True, scale=0.088)
print('strided v equal:', torch.equal(a, b), v.stride())"
    BULK_S=210 bulk defaults 1 static-features 0  # builds the llama7b model (once per machine)
    profile prefill_run "" --rows 384 --prompt 352 --max-model-len 416 --prefill-steps 40
    ;;
  alloc)  # the workload in-process alone, twice: the caching allocator's retries and cudaMalloc/cudaFree over the
    # run (a prefill's activations where the KV cache leaves little room), then with expandable segments
    PROFILE_S=175 profile alloc_default "" --no-scenarios --max-model-len 768 --workload 2048
    PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True PROFILE_S=160 profile alloc_expandable "" --no-scenarios \
        --max-model-len 768 --workload 2048
    ;;
  trace)  # #22: the workload in-process with every step traced (kind, the step before, tokens, rows, device ms),
    # overlapped prefill on and off; prefill steps alone at two prompt lengths
    profile trace "" --no-scenarios --max-model-len 768 --workload 2048 --workload-warmup 256
    profile trace_no_overlap "overlap_prefill=0" --no-scenarios --max-model-len 768 --workload 2048 --workload-warmup 256
    profile prefill_short "" --no-scenarios --max-model-len 768 --prefill-steps 20 --prompt 64
    profile prefill_long "" --no-scenarios --max-model-len 768 --prefill-steps 20 --prompt 352
    ;;
  cold)  # #22: the workload's first run in a process (JIT, compiles, the outlier guard's first columns) against a
    # second run in the same process, every step traced
    profile cold "" --no-scenarios --max-model-len 768 --workload 2048 --workload-warmup 2048
    ;;
  warm)  # #22 with the engine's warm-up: bulk on a fresh worker; the workload's first and second runs in-process
    BULK_S=240 bulk defaults 1 static-features 0  # builds the llama7b model (once per machine)
    PROFILE_S=${PROFILE_S:-200} profile cold "" --no-scenarios --max-model-len 768 --workload 2048 --workload-warmup 2048
    ;;
  prefill-ab)  # #22 with the warm-up: bulk at the default 4,096 prefill tokens a step, then at 8,192 (half the host
    # launches a prompt token; the warm-up now covers the budget's own row counts)
    BULK_S=230 bulk defaults 1 static-features 0  # builds the llama7b model (once per machine)
    PREFILL=8192 BULK_S=230 bulk p8192 1 static-features 0
    ;;
  prefill-big)  # after prefill-ab: 16,384 prefill tokens a step, then 8,192 again
    PREFILL=16384 BULK_S=200 bulk p16384 1 static-features 0  # builds the llama7b model (once per machine)
    PREFILL=8192 BULK_S=170 bulk p8192 1 static-features 0
    ;;
  rotate)  # #20 with --int8-rotate down: quality of the goal's variants at three seeds; the speed bounds (decode
    # step, prefill) of the default and the rotated default against int_mm, outliers planted as a real model has them
    run 380 quality python3 -m benchmarks.quality --device cuda --no-speed --no-kv --seeds 3 \
        --variants default,default_rotated,bnb_t6,weight_only --out "$out/quality.json"
    run 170 speed python3 -m benchmarks.quality --device cuda --speed-only --speed-outliers 20 --out "$out/speed.json"
    ;;
  rotate-bulk)  # #20's third bound, bulk end to end: the default, the rotated default and int_mm
    BULK_S=170 bulk defaults 1 static-features 0  # builds the llama7b model (once per machine)
    BATCHGEN_INT8_ROTATE=down BULK_S=150 bulk rotated 1 static-features 0
    BATCHGEN_INT8_KERNEL=int_mm BULK_S=150 bulk int_mm 1 static-features 0
    ;;
  defaults-twice)  # #22 on the checkout's defaults (--int8-rotate auto rotates the down projections), twice
    BULK_S=200 bulk defaults 1 static-features 0  # builds the llama7b model (once per machine)
    BULK_S=150 bulk defaults_again 1 static-features 0
    ;;
  baselines)  # HF's baselines on the machine `defaults-twice` ran on: int8 bs 1 and 256, fp16 static at 256 and at
    # the most rows that fit
    run 420 baselines python3 -m benchmarks.bulk --only baselines --int8-bs 256 --fp16 256:static --out "$out/baselines"
    ;;
  same-machine)  # #22's table from one machine: bulk on the defaults, then HF's baselines
    BULK_S=200 bulk defaults 1 static-features 0  # builds the llama7b model (once per machine)
    run 270 baselines python3 -m benchmarks.bulk --only baselines --int8-bs 256 --fp16 256:static --out "$out/baselines"
    ;;
  fp8v)  # --kv-cache-dtype fp8v (V in e4m3, K exact): its drift on the GPU, and bulk against the defaults and fp8
    run 200 quality_kv python3 -m benchmarks.quality --device cuda --kv-only --out "$out/quality_kv.json"
    BULK_S=200 bulk defaults 1 static-features 0  # builds the llama7b model (once per machine)
    BULK_S=150 bulk fp8v 1 static-features 0 1 fp8v
    BULK_S=150 bulk fp8 1 static-features 0 1 fp8
    ;;
  int8kv)  # --kv-cache-dtype int8 (a scale per token and KV head) end to end, then the defaults on the same machine
    BULK_S=210 bulk int8 1 static-features 0 1 int8  # builds the llama7b model (once per machine)
    BULK_S=160 bulk defaults 1 static-features 0
    ;;
  int8kv-ab)  # right after int8kv on the same machine: HF's baselines (the 3x goal), then int8 K/V again
    run 270 baselines python3 -m benchmarks.bulk --only baselines --int8-bs 256 --fp16 256:static --out "$out/baselines"
    BULK_S=160 bulk int8_again 1 static-features 0 1 int8
    ;;
  int8kv-final)  # right after int8kv on the same machine, when device time is short: HF's baselines (the 3x goal),
    # then int8 K/V's drift on the GPU beside fp8 and fp8v (#20's bounds)
    run 270 baselines python3 -m benchmarks.bulk --only baselines --int8-bs 256 --fp16 256:static --out "$out/baselines"
    run 200 quality_kv python3 -m benchmarks.quality --device cuda --kv-only --out "$out/quality_kv.json"
    ;;
  int8kv-kernel)  # int8 K/V's slow decode attention (1.0 TB/s at the bulk state against fp16's 2.5): bulk with its V
    # scales on the softmax weights (--int8-kv-scales p), then the defaults; the kernel's variants at 614 rows
    BATCHGEN_INT8_KV_SCALES=p BULK_S=200 bulk int8_p 1 static-features 0 1 int8  # builds the llama7b model
    BULK_S=150 bulk defaults 1 static-features 0
    run 150 kernels python3 -m benchmarks.kernels --only attention --rows 614 --mean-ctx 360 --max-len 768 \
        --out "$out/kernels"
    ;;
  int8kv-fast)  # int8 K/V made fp16 by ALU instructions instead of conversions (its kernel was conversion-bound):
    # the kernel's variants at the int8 bulk state first (a broken asm shows in max_abs_err), then bulk int8 and the
    # defaults on the same machine
    state_kernels kernels 150 ''
    BULK_S=200 bulk int8_fast 1 static-features 0 1 int8  # builds the llama7b model
    BULK_S=160 bulk defaults 1 static-features 0
    ;;
  int8kv-paged)  # int8 K/V's kernel over the engine's paged cache (1.18 ms a layer at 614 rows in the profile,
    # 1.6 TB/s): several blocks an inner step, a deeper pipeline (INT8_LAUNCH); bulk int8, then the defaults
    state_kernels kernels 150 ''
    BULK_S=200 bulk int8_paged 1 static-features 0 1 int8  # builds the llama7b model
    BULK_S=160 bulk defaults 1 static-features 0
    ;;
  int8kv-issue)  # the int8 decode kernel with fewer instructions a KB (it is bound by their issue): the kernel sweep
    # at the int8 bulk state (every variant's instruction count beside its bandwidth), bulk int8 K/V with the
    # biased kernel, then the defaults: whether int8 K/V passes them end to end
    state_kernels kernels 150 ''
    BATCHGEN_INT8_KV_SCALES=v-bias BULK_S=200 bulk int8_bias 1 static-features 0 1 int8  # builds the llama7b model
    BULK_S=160 bulk defaults 1 static-features 0
    ;;
  int8kv-issue-2)  # right after int8kv-issue on the same machine (its model in /tmp): bulk int8 K/V with the default
    # kernel, then the biased one at more rows than the 1,024 ceiling (int8 K/V held 221k of its 497k tokens'
    # blocks at 614 mean rows: rows, not blocks, bound it), and a decode step at the int8 bulk state
    BULK_S=170 bulk int8 1 static-features 0 1 int8
    BATCHGEN_MAX_BATCH=1536 BATCHGEN_INT8_KV_SCALES=v-bias BULK_S=170 bulk int8_bias_1536 1 static-features 0 1 int8
    profile int8_bias "kv_cache_dtype=int8,int8_kv_scales=v-bias" --rows 614 --prompt 352 --max-model-len 416
    ;;
  tune-int8kv)  # the GEMV again (its widening by byte permutes: the dot path needs half the instructions it did) and
    # the GEMM at int8 K/V's rows (~640; the table's nearest were 384 and 1,024), then bulk int8 K/V on that table
    cp "$tables"/*.json "$out"/tuned/ 2>/dev/null  # int8_tune merges into the table it finds: the other shapes stay
    run 300 int8_tune python3 -m benchmarks.int8_tune --shapes llama7b --rows 640 --out "$out/tuned/int8_tune.json" \
        --budget-s 270
    cp "$out"/tuned/NVIDIA*.json "$tables"/ && log "table in use: $(ls "$tables")"
    BATCHGEN_INT8_KV_SCALES=v-bias BULK_S=200 bulk int8_bias_tuned 1 static-features 0 1 int8
    ;;
  int8kv-early)  # int8 K/V converted where each tile is loaded (cvt_early: ldmatrix of fp16 instead of the int8
    # tile read from shared memory a byte at a time): the paged launches against the default, at the int8 bulk state;
    # bulk int8 with it (--int8-kv-scales v-early), then the defaults
    state_kernels kernels 150 ''
    BATCHGEN_INT8_KV_SCALES=v-early BULK_S=200 bulk int8_early 1 static-features 0 1 int8  # builds the llama7b model
    BULK_S=160 bulk defaults 1 static-features 0
    ;;
  int8kv-fast-final)  # right after int8kv-fast on the same machine: the fp16 path's drift (#20's bounds), HF's
    # baselines (the 3x goal), a decode step at the int8 bulk state (614 rows)
    run 200 quality_kv python3 -m benchmarks.quality --device cuda --kv-only --out "$out/quality_kv.json"
    run 270 baselines python3 -m benchmarks.bulk --only baselines --int8-bs 256 --fp16 256:static --out "$out/baselines"
    profile int8_state "kv_cache_dtype=int8" --rows 614 --prompt 352 --max-model-len 416
    ;;
  int8kv-quality)  # int8 K/V's drift on the GPU beside fp8 and fp8v; its kernel at the bulk state against fp16, fp8
    run 200 quality_kv python3 -m benchmarks.quality --device cuda --kv-only --out "$out/quality_kv.json"
    run 150 kernels python3 -m benchmarks.kernels --only bandwidth,attention --rows 384 --mean-ctx 357 --max-len 768 \
        --out "$out/kernels"
    ;;
  small-vram-int8)  # small VRAM's streamed layers on the resident default's arithmetic (outlier kernel calibrated
    # through the stream, rotated down projections) against threshold 0's int_mm, which they ran before: 13B, 6 GiB
    run 570 small_vram python3 -m benchmarks.small_vram --out-dir "$out/small_vram" --skip-baselines --levers "auto:int_mm"
    ;;
  workload-only)  # the in-process half of `workload`, with a profiled window of the run
    profile workload "" --max-model-len 768 --workload 2048 --prefill-steps 40 --prompt 352 \
        --workload-profile-steps 40
    ;;
  workload)  # #22: the bulk run's prefill steps (76-80 ms of device time for ~3,900 tokens) against a run of prefill
    # steps alone (62 ms): the same workload in-process (no queue side), with the host's prefill launch time; bulk again
    BULK_S=210 bulk defaults 1 static-features 0  # builds the llama7b model (once per machine)
    profile workload "" --max-model-len 768 --workload 2048 --prefill-steps 40 --prompt 352 \
        --workload-profile-steps 40
    ;;
  int8-bulk)  # #20's third speed bound on today's code: bulk end to end, the default against int_mm (threshold 0)
    BULK_S=225 bulk defaults 1 static-features 0  # builds the llama7b model (once per machine)
    BATCHGEN_INT8_KERNEL=int_mm BULK_S=170 bulk int_mm 1 static-features 0
    ;;
  models-check)  # WHEELS=.whl-bloom (transformers 5.24 with the benchmark's wheels): the generic budget now counts
    # the prefill's own cache; BLOOM-7b1 against HF int8, then BLOOM-13B under 6 GiB twice (the second process finds
    # Triton's kernel cache warm: the first pays the int8 launches' JIT)
    run 260 models_bloom python3 -m benchmarks.models --out "$out/models" --models bloom-7b1 --num-requests 256 \
        --hf-batches 256
    run 160 small_vram_first python3 -m benchmarks.models --out "$out/sv_first" --small-vram --small-vram-kv fp8+stream
    run 130 small_vram_second python3 -m benchmarks.models --out "$out/sv_second" --small-vram \
        --small-vram-kv fp8+stream
    ;;
  fixed)  # #22's table on one machine after the warm-up fix (4076976: no outlier column opened by the warm-up):
    # bulk on the defaults (its worker log must show no "new outlier columns"), then HF's baselines; `defaults-twice`
    # after it on the same machine for a second figure
    BULK_S=200 bulk defaults 1 static-features 0  # builds the llama7b model (once per machine)
    log "outlier columns opened: $(grep -c "new outlier columns" "$out/bulk_defaults/worker.log")"
    run 270 baselines python3 -m benchmarks.bulk --only baselines --int8-bs 256 --fp16 256:static --out "$out/baselines"
    ;;
  claims)  # #22 after the claim change (19db0a4: a worker steps once its next step is full and claims the rest between
    # steps; before, the first step waited for ~10 claims): this checkout, OLD's tree (the commit before), this
    # checkout again, then HF's baselines (the 3x goal) on the same machine
    BULK_S=200 bulk defaults 1 static-features 0  # builds the llama7b model (once per machine)
    BULK_S=120 bulk_old
    BULK_S=120 bulk defaults_again 1 static-features 0
    run 230 baselines python3 -m benchmarks.bulk --only baselines --int8-bs 256 --fp16 256:static --out "$out/baselines"
    ;;
  claims-ab)  # `claims` when device time is short: this checkout first (it builds the model; tok/s counts the batch
    # alone, so going first favours neither), then OLD's tree
    BULK_S=180 bulk defaults 1 static-features 0
    BULK_S=110 bulk_old
    ;;
  regress)  # #22: the defaults measured 9,910-10,115 tok/s at 76f430e (sixth session, three machines) and
    # 8,675-8,917 since (ninth and tenth, three machines), prefill and decode device time both ~16 % longer on the
    # same 70 + 756 steps: OLD=<a tree of an earlier commit> against this checkout on one machine
    BULK_S=200 bulk defaults 1 static-features 0  # builds the llama7b model (once per machine)
    BULK_S=160 bulk_old
    BULK_S=150 bulk defaults_again 1 static-features 0
    ;;
  final)  # #22 on one machine: int8_tune's GEMMs at 384 rows (each search from the best launch any device's table
    # holds there), bulk with that table, then HF's baselines (the 3x goal)
    mkdir -p "$out/rows" /tmp/committed /tmp/tuned && cp "$tables"/NVIDIA*.json "$out/rows/" \
        && cp "$tables"/NVIDIA*.json /tmp/committed/
    run 100 int8_tune_384 python3 -m benchmarks.int8_tune --shapes llama7b --kernels gemm --rows 384 \
        --out "$out/rows/int8_tune.json" --budget-s 70
    cp "$out"/rows/NVIDIA*.json "$tables"/ && cp "$out"/rows/NVIDIA*.json /tmp/tuned/
    BULK_S=200 bulk tuned 1 static-features 0  # builds the llama7b model (once per machine)
    run 230 baselines python3 -m benchmarks.bulk --only baselines --int8-bs 256 --fp16 256:static --out "$out/baselines"
    ;;
  final-2)  # right after `final` on the same machine: bulk with the committed tables, then with final's again
    cp /tmp/committed/NVIDIA*.json "$tables"/
    BULK_S=120 bulk committed 1 static-features 0
    cp /tmp/tuned/NVIDIA*.json "$tables"/
    BULK_S=120 bulk tuned_again 1 static-features 0
    ;;
  fused-norm)  # #22 with the norm and the int8 input quantisation as one kernel (norm_linear.py): this checkout, then
    # OLD's tree (the commit before it; its first bulk compiles afresh: 120 s cut it on an H100); `baselines` after
    # it on the same machine for the 3x goal
    BULK_S=200 bulk defaults 1 static-features 0  # builds the llama7b model (once per machine)
    BULK_S=170 bulk_old
    ;;
  gated)  # the MLP's tail as one kernel and the residual in the down GEMM's epilogue (gated_linear.py): the kernel
    # alone against the pieces, then bulk on this checkout and on OLD's tree (the commit before it); `baselines`
    # after it on the same machine for the 3x goal
    run 150 gated python3 -m benchmarks.gated --out "$out/gated" --table "$tables"  # its launches into the table
    cp "$tables"/NVIDIA*.json "$out/tuned/"
    BULK_S=200 bulk defaults 1 static-features 0  # builds the llama7b model (once per machine)
    BULK_S=170 bulk_old
    ;;
  gated-final)  # #22's table with gated_linear and rope_store: the gated launches tuned into the table, rope_store
    # against the rope and the stores apart, bulk, then HF's baselines
    run 150 gated python3 -m benchmarks.gated --out "$out/gated" --table "$tables"
    run 60 rope_store python3 -m benchmarks.rope_store --out "$out/rope_store"
    cp "$tables"/NVIDIA*.json "$out/tuned/"
    BULK_S=200 bulk defaults 1 static-features 0  # builds the llama7b model (once per machine)
    run 270 baselines python3 -m benchmarks.bulk --only baselines --int8-bs 256 --fp16 256:static --out "$out/baselines"
    ;;
  card)  # whichever card came: on an H200 #22's table (bulk, HF's baselines), then the gated launches into the
    # table and rope_store against the rope and the stores apart; elsewhere the GEMM tuned at prefill's row
    # counts (the H100's table has launches at 384 and 512 rows only, so its prefill runs int_mm and the MLP's tail
    # apart), rope_store against the rope and the stores apart, then bulk with that table
    if on_h200; then  # #22's figures first
        BULK_S=200 bulk defaults 1 static-features 0  # builds the llama7b model (once per machine)
        hf_static baselines 200
        run 100 gated python3 -m benchmarks.gated --out "$out/gated" --table "$tables"
        cp "$tables"/NVIDIA*.json "$out/tuned/"
        run 40 rope_store python3 -m benchmarks.rope_store --out "$out/rope_store"
        tar czf "$OUT/round-$stage.tgz" -C "$OUT" round && log "tarred $OUT/round-$stage.tgz"
        exit 0
    fi
    cp "$tables"/*.json "$out"/tuned/
    run 200 int8_tune_prefill python3 -m benchmarks.int8_tune --shapes llama7b --kernels gemm --rows 4096,16384 \
        --out "$out/tuned/int8_tune.json" --budget-s 170
    cp "$out"/tuned/NVIDIA*.json "$tables"/ && log "table in use: $(ls "$tables")"
    run 60 rope_store python3 -m benchmarks.rope_store --out "$out/rope_store"
    BULK_S=200 bulk defaults 1 static-features 0  # builds the llama7b model (once per machine)
    ;;
  confirm)  # H200: #22's table again (bulk, HF's baselines), the GEMM tuned at the decode's larger graph buckets
    # (448 and 512 rows; the table's nearest were 384 and 1,024), bulk with that table, then bulk over an int8 cache
    # with q in int8 (v-q8-early) at its own launch
    BULK_S=200 bulk defaults 1 static-features 0  # builds the llama7b model (once per machine)
    hf_static baselines 200
    cp "$tables"/*.json "$out"/tuned/
    run 120 int8_tune_decode python3 -m benchmarks.int8_tune --shapes llama7b --kernels gemm --rows 448,512 \
        --out "$out/tuned/int8_tune.json" --budget-s 100
    cp "$out"/tuned/NVIDIA*.json "$tables"/ && log "table in use: $(ls "$tables")"
    BULK_S=130 bulk defaults_tuned 1 static-features 0
    BATCHGEN_INT8_KV_SCALES=v-q8-early BULK_S=140 bulk int8_q8 1 static-features 0 1 int8
    ;;
  ratio)  # H200: #22's 3x on a baseline that moves with the card's clock: the card idle 30 s, then HF fp16 static
    # (three runs, clocks sampled), bulk twice, HF again, bulk once more; each side's median and first run. The first
    # bulk compiles the engine's kernels (~150 s on a fresh machine), the later ones ~90 s
    sleep 30
    hf_static baselines 160 --fp16-repeats 3  # builds the llama7b model (once per machine)
    BULK_S=180 bulk defaults 1 static-features 0
    BULK_S=130 bulk defaults_2 1 static-features 0
    hf_static baselines_2 120 --fp16-repeats 3
    BULK_S=130 bulk defaults_3 1 static-features 0
    ;;
  q16)  # an int8 cache with q as two int8 terms (the plain int8 cache's drift): its launches at the int8 bulk state,
    # 64 x 2 x 3 among them, then bulk with the fastest (written into INT8_QK_LAUNCHES[2] of this copy: q16_launch)
    # and the defaults on the same machine
    state_kernels kernels 100 'paged fp16, the default launch|paged int8, the default launch|q16'
    q16_launch "$(python3 scripts/fastest_launch.py "$out/kernels.log" 'paged int8 q16 early')"
    BATCHGEN_INT8_KV_SCALES=v-q16-early BULK_S=200 bulk int8_q16 1 static-features 0 1 int8  # builds llama7b
    BULK_S=130 bulk defaults 1 static-features 0
    ;;
  q16-ab)  # right after q16 on the same machine (Q16=the launch it chose, e.g. "64, 2, 3"): HF's baseline (three
    # runs), the int8 cache's drift with q16 on the GPU's kernels beside the plain int8 cache, bulk int8 q16 again
    q16_launch "${Q16:-}"
    hf_static baselines 160 --fp16-repeats 3
    run 150 quality_kv python3 -m benchmarks.quality --device cuda --kv-only --kv-dtypes int8 \
        --int8-kv-scales v,v-q16-early --kv-attention triton --out "$out/quality_kv.json"
    BATCHGEN_INT8_KV_SCALES=v-q16-early BULK_S=130 bulk int8_q16_2 1 static-features 0 1 int8
    ;;
  int8-default)  # #22 with the int8 cache by default (auto: int8, q16 early): q16's launches at the int8 bulk state
    # (one warp a program among them), bulk with the fastest, on an H200 HF's baseline (three runs), then the exact
    # cache (compute) on the same machine
    state_kernels kernels 60 'paged fp16, the default launch|q16'
    q16_launch "$(python3 scripts/fastest_launch.py "$out/kernels.log" 'paged int8 q16 early')"
    BULK_S=200 bulk defaults 1 static-features 0  # builds the llama7b model (once per machine)
    if on_h200; then  # HF's bs 256 fits an H200 only
        hf_static baselines 110 --fp16-repeats 3
    fi
    BULK_S=120 bulk compute 1 static-features 0 1 compute
    ;;
  keys)  # int8_keys (the keys on the tiles' rows, v-q16-keys) at the int8 bulk state beside q16 early's default launch;
    # bulk on the defaults, then v-q16-keys at its fastest launch (written into this copy: keys_launch); last, the
    # drift of both on the GPU's kernels with a KV head a query head (quality --mha)
    state_kernels kernels 100 'paged fp16, the default launch|q16 early, block_n 64, warps 2, stages 3|keys'
    BULK_S=200 bulk defaults 1 static-features 0  # builds the llama7b model (once per machine)
    keys_launch "$(python3 scripts/fastest_launch.py "$out/kernels.log" 'paged int8 keys')"
    BATCHGEN_INT8_KV_SCALES=v-q16-keys BULK_S=130 bulk keys 1 static-features 0
    run 120 quality_kv python3 -m benchmarks.quality --device cuda --kv-only --mha --kv-dtypes int8 \
        --int8-kv-scales v-q16-early,v-q16-keys --kv-attention triton --out "$out/quality_kv.json"
    ;;
  stalls)  # where the int8 decode kernels' warps wait, by Nsight Compute where the image has it: int8_keys at its
    # launch and q16 early at its, one launch each at the int8 bulk state (warp states, scheduler, occupancy, memory)
    ncu=$(command -v ncu || ls /usr/local/cuda/bin/ncu /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
    log "ncu: ${ncu:-none}"
    # STALL_LAUNCHES: the launches to profile, as benchmarks.kernels names them (default: the two defaults); each
    # with its warps' stall reasons a issued instruction
    IFS='|' read -r -a patterns <<< "${STALL_LAUNCHES:-keys, block_n 32, warps 1, stages 4|q16 early, block_n 64, warps 2, stages 3}"
    for pattern in "${patterns[@]}"; do
        [ -n "$ncu" ] || break
        name=ncu_$(echo "$pattern" | tr -c 'a-z0-9\n' _ | tr -s _)
        run 200 "$name" "$ncu" --kernel-name regex:'_keys_kernel|_split_kernel' --launch-skip 5 --launch-count 1 \
            --section WarpStateStats --section SchedulerStats --section Occupancy --section LaunchStats \
            --section MemoryWorkloadAnalysis --section SpeedOfLight \
            --metrics 'regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio' \
            python3 -m benchmarks.kernels --only attention --rows 614 --mean-ctx 360 --max-len 768 \
            --out "$out/$name" --match "$pattern"
    done
    ;;
  keys-default)  # the committed default's int8 kernels at the int8 bulk state (fp16's at the bus beside them), then
    # bulk on the defaults: #22's decode efficiency where device time is short for `committed`
    default_kernels
    BULK_S=200 bulk defaults 1 static-features 0
    ;;
  q16-bulk)  # after keys-default, on an H200 (its baseline): bulk with the int8 cache's previous kernel (v-q16-early)
    BATCHGEN_INT8_KV_SCALES=v-q16-early BULK_S=200 bulk q16 1 static-features 0
    ;;
  committed)  # #22 on the checkout as committed (no launch written into the copy): the int8 cache's kernels at their
    # default launches at the int8 bulk state, bulk on the defaults, HF's baseline (three runs; bs 256 fits an H200
    # only), bulk again
    default_kernels
    BULK_S=200 bulk defaults 1 static-features 0  # builds the llama7b model (once per machine)
    hf_static baselines 120 --fp16-repeats 3
    BULK_S=130 bulk defaults_2 1 static-features 0
    ;;
  probe)  # after `card` on the same machine: where the int8 K/V kernel's time goes (the int8 cache's bytes read by
    # the fp16 kernel at half the head size: at the bus, 1-byte tiles hold it; near int8's rate, a key's own cost
    # does) and q rounded to int8 against K unconverted (qk_int8) at launches with more programs an SM, at the int8
    # bulk state; then a decode step's profile at the bulk state with this tree's kernels
    state_kernels kernels 200 \
        'bytes as fp16|the default launch|paged fp16, 3 stages, ids ahead|v-bias, block_n 64, warps 2|q8|q16'
    profile bulk_state "" --rows 384 --prompt 352 --max-model-len 416
    ;;
  vt-ab)  # vt's two bulks twice more in the other order (defaults first) on one machine, then vt_keys where the card
    # is an H200 (its kernels and the store at every SM and at 96)
    BULK_S=200 bulk defaults 1 static-features 0  # builds the llama7b model (once per machine)
    KV_SCALES=v-q16-keys-vt BULK_S=150 bulk vt 1 static-features 0
    BULK_S=150 bulk defaults_2 1 static-features 0
    KV_SCALES=v-q16-keys-vt BULK_S=150 bulk vt_2 1 static-features 0
    if on_h200; then
        run 120 vt_keys python3 -m benchmarks.vt_keys --sms 0 96 --out "$out/vt_keys.json"
    fi
    ;;
  step)  # the keys kernel's launches over both pool layouts beside OLD's kernel (the commit before) at the int8
    # bulk state (614 rows, mean context 385), a profile of a decode step there (PROFILE=1), bulk on the committed
    # defaults (the int8 pool with each block's heads outermost), then bulk on OLD's tree (BULK_OLD=0: not), then
    # (HF=0: not) HF's baseline and the defaults again; KEYS_AB=0: no kernels; PARTITION=1: benchmarks.partition last
    [ "${KEYS_AB:-1}" = 0 ] || keys_ab
    [ "${PROFILE:-0}" = 0 ] || profile int8_state "" --rows 614 --prompt 352 --max-model-len 416
    BULK_S=200 bulk defaults 1 static-features 0
    [ "${BULK_OLD:-1}" = 0 ] || BULK_S=170 bulk_old
    if [ "${HF:-1}" = 1 ]; then  # #22's table in the same call: HF's baseline (three runs), the defaults again
        hf_static baselines 120 --fp16-repeats 3
        BULK_S=130 bulk defaults_2 1 static-features 0
    fi
    [ "${PARTITION:-0}" = 0 ] || partition  # PARTITION=1: the SM-split probe last, in what time the call has left
    ;;
  partition)  # a decode step's attention and its int8 projections at the bulk state: alone, on two streams, on
    # disjoint green contexts
    partition
    ;;
  vt)  # V transposed in each block (int8_keys._vt_kernel): bulk on v-q16-keys-vt and on the defaults;
    # benchmarks.vt_keys on every SM and on 96 (the engine's V^T kernel and its keys kernel at several launches, and
    # a step's V store into each pool: written in runs, sealed into V^T where a block fills); HF's baseline where
    # the card is an H200 (#22's table); the drift of both kernels at the GPU shape (quality --mha): most wanted
    # first, so a call cut at its limit keeps what ran
    KV_SCALES=v-q16-keys-vt BULK_S=200 bulk vt 1 static-features 0  # builds the llama7b model (once per machine)
    BULK_S=170 bulk defaults 1 static-features 0
    run 150 vt_keys python3 -m benchmarks.vt_keys --sms 0 96 --out "$out/vt_keys.json"
    if on_h200; then  # #22's card: its HF baseline too
        hf_static baselines 120 --fp16-repeats "${HF_REPEATS:-3}"
    fi
    run 120 quality_kv python3 -m benchmarks.quality --device cuda --kv-only --mha --kv-dtypes int8 \
        --int8-kv-scales v-q16-keys,v-q16-keys-vt --kv-attention triton --out "$out/quality_kv.json"
    ;;
  vt-short)  # vt in what little device time is left: vt_keys first (kernels and the store), then the two bulks
    run 120 vt_keys python3 -m benchmarks.vt_keys --sms 0 96 --out "$out/vt_keys.json"
    KV_SCALES=v-q16-keys-vt BULK_S=170 bulk vt 1 static-features 0
    BULK_S=150 bulk defaults 1 static-features 0
    ;;
  state614)  # #22 on whatever card comes: a decode step at about the H200's bulk state (614 rows; ~380 tokens of
    # context, what an H100's memory holds for them) profiled with V^T and with the keys kernel: where the time beside
    # attention goes (the int8 GEMMs at 614 rows are compute-bound: an H100 times them as an H200 would); then the
    # GEMM's launches searched at 640 rows (the graph bucket of 577-640 rows, between the table's 512 and 1024)
    PROFILE_S=200 profile vt614 int8_kv_scales=v-q16-keys-vt --rows 614 --prompt 352 --max-model-len 400 --steps 24
    PROFILE_S=150 profile keys614 int8_kv_scales=v-q16-keys --rows 614 --prompt 352 --max-model-len 400 --steps 24
    mkdir -p "$out/rows" && cp "$tables"/NVIDIA*.json "$out/rows/"
    run 200 int8_tune_640 python3 -m benchmarks.int8_tune --shapes llama7b --kernels gemm --rows 640 \
        --out "$out/rows/int8_tune.json" --budget-s 170
    ;;
  rows-tune)  # the GEMM searched at the decode buckets between the table's 512 and 1024 rows (576, 640, 704: an
    # H200's bulk runs at ~614 rows), each search's start (this card's table before) timed beside its best; the MLP
    # tail's quantiser at those rows (gated_rows); the tables with them in use, a step at 614 rows profiled (keys)
    tune_rows 200 170
    PROFILE_S=200 profile rows614 int8_kv_scales=v-q16-keys --rows 614 --prompt 352 --max-model-len 400 --steps 24
    ;;
  h200)  # #22 in one call on an H200: the GEMM and the gated quantiser at 576-704 rows tuned on the card and put
    # in use (commit $out/tables/NVIDIA_H200.json after); bulk on the defaults; HF's fp16 static baseline; bulk on
    # V^T; the defaults again. Elsewhere: mps
    if ! on_h200; then
        exec bash "$0" mps
    fi
    tune_rows 150 120
    BULK_S=200 bulk defaults 1 static-features 0  # builds the llama7b model (once per machine)
    hf_static baselines 120 --fp16-repeats "${HF_REPEATS:-3}"  # #22's table first; the V^T question after
    KV_SCALES=v-q16-keys-vt BULK_S=150 bulk vt 1 static-features 0
    agree defaults vt
    BULK_S=120 bulk defaults_2 1 static-features 0
    agree defaults defaults_2
    ;;
  short)  # #22 in little device time: on an H200 the GEMM at 576-704 rows tuned on the card (no gated quantiser),
    # bulk on the defaults, then on V^T; elsewhere mps-profile
    if ! on_h200; then
        exec bash "$0" mps-profile
    fi
    gemm_rows 120 90
    vt_ab
    ;;
  fuse-ab)  # a step at 614 rows profiled (keys kernel, then V^T) with RoPE and the int8 K/V store in one launch;
    # bulk on this tree, then on OLD's (its last bulk ran before both), then this tree again
    PROFILE_S=200 profile keys614 int8_kv_scales=v-q16-keys --rows 614 --prompt 352 --max-model-len 400 --steps 24
    PROFILE_S=120 profile vt614 int8_kv_scales=v-q16-keys-vt --rows 614 --prompt 352 --max-model-len 400 --steps 24
    BULK_S=170 bulk defaults 1 static-features 0
    BULK_S=170 bulk_old
    BULK_S=120 bulk defaults_2 1 static-features 0
    ;;
  vt-rope)  # V^T with its V stored in runs by rope_store and the filled blocks sealed by the grouped seal: a step at
    # 614 rows profiled, then bulk on V^T and on the defaults
    PROFILE_S=200 profile vt614 int8_kv_scales=v-q16-keys-vt --rows 614 --prompt 352 --max-model-len 400 --steps 24
    KV_SCALES=v-q16-keys-vt BULK_S=150 bulk vt 1 static-features 0
    BULK_S=150 bulk defaults 1 static-features 0
    ;;
  check)  # what landed since the last timed run: a step at 614 rows (RoPE and the store share `_rotated`; masked
    # lanes zeroed), vt_keys with its stores timed in a CUDA graph, bulk on the defaults
    PROFILE_S=180 profile keys614 int8_kv_scales=v-q16-keys --rows 614 --prompt 352 --max-model-len 400 --steps 24
    run 120 vt_keys python3 -m benchmarks.vt_keys --sms 0 96 --out "$out/vt_keys.json"
    BULK_S=170 bulk defaults 1 static-features 0
    ;;
  mps)  # an H200's bus per SM on an H100 for whole runs: every CUDA process here under MPS with ~73 % of the SMs
    # (~96 of 132; CUDA_MPS_ACTIVE_THREAD_PERCENTAGE, MPS_PCT overrides); vt_keys on every SM it is given (against
    # its green-context figures at 96), then bulk on the defaults, V^T, the defaults, V^T. First, on every SM, the
    # gated quantiser tuned at 512-704 rows, the table then in use
    gated_rows
    start_mps
    run 90 vt_keys_mps python3 -m benchmarks.vt_keys --sms 0 --out "$out/vt_keys_mps.json"
    BULK_S=200 bulk defaults 1 static-features 0
    KV_SCALES=v-q16-keys-vt BULK_S=130 bulk vt 1 static-features 0
    BULK_S=130 bulk defaults_2 1 static-features 0
    KV_SCALES=v-q16-keys-vt BULK_S=130 bulk vt_2 1 static-features 0
    ;;
  tiny)  # #22 in ~5 min: on an H200 vt_keys on every SM (the V^T kernel against the keys kernel on the card), then bulk
    # on the defaults and on V^T as far as the call lasts; elsewhere mps-profile
    if ! on_h200; then
        exec bash "$0" mps-profile
    fi
    run 60 vt_keys python3 -m benchmarks.vt_keys --sms 0 --out "$out/vt_keys.json"
    vt_ab
    ;;
  vt-check)  # V^T's correctness on the GPU: vt_check (Llama-7B's heads, 4 layers), then bulk on the defaults and on
    # V^T and how far their texts agree (random weights: V^T rounds P·V otherwise, so texts part at near-ties within
    # a few tokens; two runs on the defaults agree whole on ~0.95 and on every prefix)
    vt_check
    vt_ab
    ;;
  vt-agree)  # how far V^T's texts follow the defaults' against how far two runs on the defaults follow each other
    # (whole texts and their first 16/64/256 characters): bulk on the defaults, V^T, the defaults
    vt_ab
    BULK_S=130 bulk defaults_2 1 static-features 0
    agree defaults defaults_2
    ;;
  mps-profile)  # a step at 614 rows (an H200's bulk state) under MPS (an H200's bus per SM), keys kernel then V^T:
    # 40 steps from 352 prompt tokens, so every row's sixth block fills (V^T's seal) within them
    start_mps
    PROFILE_S=200 profile keys614_mps int8_kv_scales=v-q16-keys --rows 614 --prompt 352 --max-model-len 416 --steps 40
    PROFILE_S=150 profile vt614_mps int8_kv_scales=v-q16-keys-vt --rows 614 --prompt 352 --max-model-len 416 \
        --steps 40
    ;;
  vt-garbage)  # V^T opened hundreds of int8 outlier columns an input in mps-profile (the keys kernel none):
    # kv_faults (profile_steps' scenario, every live row's whole K/V blocks checked after each step: the first step
    # that leaves one unsound) on every SM with V^T, then the keys kernel, then V^T under MPS
    faults 200 vt v-q16-keys-vt
    faults 160 keys v-q16-keys
    start_mps
    faults 170 vt_mps v-q16-keys-vt
    ;;
  vt-sites-short)  # after vt-garbage (V^T: 32 K and 32 V faults at one decode step on every SM; under MPS nearly
    # every token's K and V from the first prefill on): where the faults are and what they hold (kv_faults'
    # fault_sites), V^T on every SM, then under MPS
    faults 200 vt v-q16-keys-vt
    start_mps
    faults 130 vt_mps v-q16-keys-vt
    ;;
  vt-mps-trace)  # after vt-sites-short: under MPS, V^T stored NaNs from layer 2 on in the first prefill (the keys
    # kernel's profile under MPS opened no outliers): kv_faults' first-prefill trace (per layer the first non-finite
    # token of its input, attention output and residual stream, and their peaks; of the q/k/v each attention was
    # given, and the first token of each its store and seal wrote over), each layer's largest K/V scale after the
    # first step, and the int8 state at build, V^T then keys under MPS; then V^T on every SM again (its two faults
    # had a pad token's signature: the sites now carry token ids)
    start_mps
    faults 200 vt_mps v-q16-keys-vt  # builds the model first on a fresh machine
    faults 130 keys_mps v-q16-keys
    stop_mps
    faults 160 vt v-q16-keys-vt
    ;;
  mps-check)  # whether MPS gives the kernels an H200's bus per SM: vt_keys on every SM and a 96-SM green context,
    # then under MPS on what it is given
    run 90 vt_keys python3 -m benchmarks.vt_keys --sms 0 96 --out "$out/vt_keys.json"
    start_mps
    run 90 vt_keys_mps python3 -m benchmarks.vt_keys --sms 0 --out "$out/vt_keys_mps.json"
    ;;
  keys-ab)  # keys_ab alone: the keys kernel's launches over both pool layouts, OLD's beside them
    keys_ab
    ;;
  profile)
    profile untuned tuned_kernels=0
    profile tuned tuned_kernels=1
    ;;
  *) echo "unknown stage $stage" >&2; exit 2 ;;
esac
tar czf "$OUT/round-$stage.tgz" -C "$OUT" round && log "tarred $OUT/round-$stage.tgz"
