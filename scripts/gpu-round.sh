#!/usr/bin/env bash
# The GPU measurements pending since the last run, as stages that each fit one device call (10 min): every command
# runs under its own timeout so that the results of the others come back, all under $OUT/round, tarred at the end.
#   source scripts/device-setup.sh && bash scripts/gpu-round.sh tune   # int8_tune, then profile_steps with its table
#   source scripts/device-setup.sh && bash scripts/gpu-round.sh ab     # profile without it and with static compile
#                                                                      # shapes; bulk: defaults vs tuned + static
#   source scripts/device-setup.sh && bash scripts/gpu-round.sh mixed  # bulk with and without --mixed-steps
# The table `tune` writes lands in $OUT/round/tuned/ (and is used by that call's profile); $OUT is new in every call,
# so commit it as worker/engine/kernels/tuned/<device>.json before `ab` and `mixed`, which read it from the checkout.
set -u
stage="${1:?stage: tune, ab or mixed}"
out="${OUT:?run on the device machine}/round"
tables=worker/engine/kernels/tuned  # where the engine reads the table (kernels/tuned.py)
mkdir -p "$out/tuned" "$tables"
log() { echo "[$(date +%T)] $*" | tee -a "$out/round.log"; }
run() {  # run SECONDS NAME CMD...: output to NAME.log, its exit status in round.log
    local limit=$1 name=$2
    shift 2
    log "start $name: $*"
    timeout "$limit" "$@" > "$out/$name.log" 2>&1
    log "end $name: exit $?"
}
profile() {  # profile NAME ENGINE_OPTIONS
    run 130 "profile_$1" python3 -m benchmarks.profile_steps --models llama7b --steps 16 --out "$out/profile_$1" \
        --engine-options "$2"
}

case "$stage" in
  tune)
    run 330 int8_tune python3 -m benchmarks.int8_tune --shapes llama7b --out "$out/tuned/int8_tune.json" \
        --budget-s 300
    cp "$out"/tuned/NVIDIA*.json "$tables"/ && log "table in use: $(ls "$tables")"
    profile tuned tuned_kernels=1  # the llama7b model is built here, once per machine
    ;;
  ab)
    cp "$out"/tuned/NVIDIA*.json "$tables"/ 2>/dev/null || true  # else a table committed since, or none
    profile untuned tuned_kernels=0
    profile static compile_shapes=static-features
    for cfg in "0 dynamic" "1 static-features"; do
        set -- $cfg
        BATCHGEN_TUNED_KERNELS=$1 BATCHGEN_COMPILE_SHAPES=$2 run 200 "bulk_tuned$1_$2" \
            python3 -m benchmarks.bulk --only batchgen --skip-512 --no-fit --agree-requests 0 --out "$out/bulk_tuned$1_$2"
    done
    ;;
  mixed)
    cp "$out"/tuned/NVIDIA*.json "$tables"/ 2>/dev/null || true
    for m in 1 0; do
        BATCHGEN_MIXED_STEPS=$m run 240 "bulk_mixed$m" \
            python3 -m benchmarks.bulk --only batchgen --skip-512 --no-fit --agree-requests 0 --out "$out/bulk_mixed$m"
    done
    ;;
  *) echo "unknown stage $stage" >&2; exit 2 ;;
esac
tar czf "$OUT/round-$stage.tgz" -C "$OUT" round && log "tarred $OUT/round-$stage.tgz"
