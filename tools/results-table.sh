#!/usr/bin/env bash
# Trains every run of the README results table (issue #4) and writes the table.
#
#   tools/results-table.sh [--dataset ham10000|pneumoniamnist|all] [--device cpu|cuda|cuda:N]
#                          [--epochs N] [--jobs J] [--out DIR] [--bin PATH] [--data-root DIR]
#                          [--all-seeds] [--budget SECONDS] [--set KEY=VALUE]... [--first NAMES]
#                          [--dry-run]
#
# Runs (all: preset `fast` = width 16, 28 px, 12 labelled + 36 unlabelled images per step, Adam
# lr 1e-3 with cosine decay over the run, weight decay 5e-4, and SPEC §1's loss weights; only the
# epochs, the method switches, the labelled subset and the seed change):
#   HAM10000 (--labeled-protocol srcmt: SRC-MT benchmark split, 1400 labelled / 5600 unlabelled):
#     supervised 20 % (seeds 0, 1)      --method supervised
#     supervised 100 % (seed 0)         --method supervised --labeled-protocol srcmt-full
#     Mean Teacher (seed 0)             --method mean-teacher
#     DSRPGC (seeds 0, 1)               --method dsrpgc
#     DSRPGC + DSR balance (align)      --dsr-balance align (seed 0; an option outside SPEC §1)
#     DSRPGC − DSR / − fusion / − PGC   --dsr off / --no-fusion / --no-pgc (seed 0 each)
#   PneumoniaMNIST (--labeled-ratio 0.2 of the official train split):
#     supervised 20 % (seeds 0, 1), DSRPGC (seeds 0, 1)
# --all-seeds runs every row with seeds 0 and 1.
# Order: the longest runs start first (the shortest total time); --first NAME[,NAME...] starts the
# named runs (e.g. ham10000-supervised-20-s0) before all others, in the order given.
#
# Supervised 100 %: `--labeled-protocol srcmt-full` is the same benchmark split with all 7000
# training rows labelled (no unlabelled set; an epoch is then one pass over the 7000 labelled
# images), so the upper bound is evaluated on the same validation and test images as the others.
#
# Each run goes to OUT/<name>/ (a normal `medssl train` run directory), its log to
# OUT/logs/<name>.log, its command to OUT/commands.txt (continued runs also to OUT/resumed.txt;
# summary.json's wall time of a continued run is the sum over its invocations). The
# script is resumable: a run whose summary.json says "finished" is skipped; a run directory with
# last.safetensors but no finished summary (stopped by a signal, by --budget, or killed) is
# continued with `medssl train --resume`; a directory left by a run that died before its first
# checkpoint is moved aside (<name>.stale-*) and started again. At the end `medssl report
# --skip-bad` writes OUT/table.md (Markdown, the README format), OUT/table.json and
# OUT/table.txt over the runs of the selected datasets; unfinished runs are listed under the
# table and on stderr, never dropped silently.
#
# --jobs J runs J trainings at once (default 1 on cpu, 6 on cuda). A width-16 step is
# latency-bound on a big GPU (host syncs and launches), so concurrent processes multiply the
# throughput until the GPU or the host cores saturate. Each process gets RAYON_NUM_THREADS =
# cores / J (unless RAYON_NUM_THREADS is set) plus its 2 loader threads. Wall times in the table
# are measured under this sharing; the table notes the device and J.
# --budget S stops everything after S seconds of training: running trainings get SIGTERM, finish
# their step, write last.safetensors and exit; the table is written from what finished; run the
# same command again to continue. SIGTERM/SIGINT to this script do the same.
# --set KEY=VALUE is passed to every `medssl train` (e.g. --set width=4 for a smoke test); it
# changes the settings, so such runs form their own rows.
#
# Expected time: per epoch a HAM10000 SSL run takes 155 steps, PneumoniaMNIST 104; supervised
# 100 % takes 583 steps of 12 images (one pass over the 7000 training images). Measured on a
# 2-core CPU with --jobs 2 (one thread each): a HAM10000 DSRPGC epoch about 70 s with training
# alone on the machine, a supervised 100 % epoch about 50 s; so about 2 h per 100-epoch DSRPGC
# run, and in practice (other work on the machine) 2.3-2.9 h per HAM10000 SSL run, 2.2 h for
# supervised 100 %, 0.75 h per supervised 20 % run: about 14 h for the 14 runs. On one H200 (11.8 ms per DSRPGC step, 6.3 ms supervised, when alone) the 14 runs are
# about 35 min of GPU work back to back; with --jobs 14 they are expected to take 10-15 min
# (the gain from concurrency is what the first GPU session measures), so the GPU pack runs it
# under --budget and resumes (tools/gpu-run.sh, TABLE=1).
#
# Exit status: 0 when every run finished and the table lists them all, 3 when runs are left
# unfinished (budget or signal; run again to continue), 1 when a training failed (see its log).
set -uo pipefail

# The whole script is one brace group, which bash parses completely before running any of it: a
# driver that runs for hours is not broken by a `git pull` or an edit of this file meanwhile
# (bash would otherwise read the changed file from the old offset).
{
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

DATASET=all
DEVICE=cpu
EPOCHS=100
JOBS=""
OUT="runs/table"
BIN=""
DATA_ROOT="$ROOT/../shared/data"
ALL_SEEDS=0
BUDGET=0
DRY=0
SETS=()
FIRST=""

usage() { sed -n '2,7p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }
die() {
    echo "results-table: $*" >&2
    exit 2
}

while [ $# -gt 0 ]; do
    case "$1" in
    --dataset) DATASET="${2:?--dataset needs a value}"; shift 2 ;;
    --device) DEVICE="${2:?--device needs a value}"; shift 2 ;;
    --epochs) EPOCHS="${2:?--epochs needs a value}"; shift 2 ;;
    --jobs) JOBS="${2:?--jobs needs a value}"; shift 2 ;;
    --out) OUT="${2:?--out needs a value}"; shift 2 ;;
    --bin) BIN="${2:?--bin needs a value}"; shift 2 ;;
    --data-root) DATA_ROOT="${2:?--data-root needs a value}"; shift 2 ;;
    --budget) BUDGET="${2:?--budget needs a value}"; shift 2 ;;
    --set) SETS+=(--set "${2:?--set needs KEY=VALUE}"); shift 2 ;;
    --all-seeds) ALL_SEEDS=1; shift ;;
    --first) FIRST="${2:?--first needs run names}"; shift 2 ;;
    --dry-run) DRY=1; shift ;;
    -h | --help) usage; exit 0 ;;
    *) usage >&2; die "unknown argument '$1'" ;;
    esac
done

case "$DATASET" in ham10000 | pneumoniamnist | all) ;; *) die "--dataset '$DATASET': expected ham10000, pneumoniamnist or all" ;; esac
case "$DEVICE" in cpu | cuda | cuda:[0-9]*) ;; *) die "--device '$DEVICE': expected cpu, cuda or cuda:N" ;; esac
[[ "$EPOCHS" =~ ^[1-9][0-9]*$ ]] || die "--epochs '$EPOCHS': expected a positive integer"
[[ "$BUDGET" =~ ^[0-9]+$ ]] || die "--budget '$BUDGET': expected seconds (0: no limit)"
if [ -z "$JOBS" ]; then
    if [ "$DEVICE" = cpu ]; then JOBS=1; else JOBS=6; fi
fi
[[ "$JOBS" =~ ^[1-9][0-9]*$ ]] || die "--jobs '$JOBS': expected a positive integer"
if [ -z "$BIN" ]; then
    if [ -x "$ROOT/target/release/medssl" ]; then
        BIN="$ROOT/target/release/medssl"
    else
        BIN="$(command -v medssl || true)"
    fi
fi
if [ -z "$BIN" ] || [ ! -x "$BIN" ]; then die "no medssl binary (build it: cargo build --release --bin medssl; or pass --bin PATH)"; fi
BIN="$(cd "$(dirname "$BIN")" && pwd)/$(basename "$BIN")"

# ------------------------------------------------------------------ the runs ----
# name|dataset|seed|cost|flags (flags: space-separated, no spaces inside). cost: a rough
# relative run time (steps per epoch x step cost) so the longest runs start first.
PLAN=()
seeds_of() { # ROW_SEEDS: "0 1" for the rows measured with two seeds, else "0" (all with --all-seeds)
    if [ "$1" = 2 ] || [ "$ALL_SEEDS" = 1 ]; then echo "0 1"; else echo "0"; fi
}
add() { # NAME DATASET NSEEDS COST FLAGS...
    local name=$1 ds=$2 n=$3 cost=$4 s
    shift 4
    for s in $(seeds_of "$n"); do
        PLAN+=("$name-s$s|$ds|$s|$cost|$*")
    done
}
if [ "$DATASET" = ham10000 ] || [ "$DATASET" = all ]; then
    P=(--labeled-protocol srcmt)
    add ham10000-supervised-20 ham10000 2 775 --method supervised "${P[@]}"
    add ham10000-supervised-100 ham10000 1 2900 --method supervised --labeled-protocol srcmt-full
    add ham10000-mean-teacher ham10000 1 1550 --method mean-teacher "${P[@]}"
    add ham10000-dsrpgc ham10000 2 1860 --method dsrpgc "${P[@]}"
    add ham10000-dsrpgc-align ham10000 1 1860 --method dsrpgc --dsr-balance align "${P[@]}"
    add ham10000-dsrpgc-no-dsr ham10000 1 1800 --method dsrpgc --dsr off "${P[@]}"
    add ham10000-dsrpgc-no-fusion ham10000 1 1700 --method dsrpgc --no-fusion "${P[@]}"
    add ham10000-dsrpgc-no-pgc ham10000 1 1700 --method dsrpgc --no-pgc "${P[@]}"
fi
if [ "$DATASET" = pneumoniamnist ] || [ "$DATASET" = all ]; then
    add pneumoniamnist-supervised-20 pneumoniamnist 2 520 --method supervised --labeled-ratio 0.2
    add pneumoniamnist-dsrpgc pneumoniamnist 2 1250 --method dsrpgc --labeled-ratio 0.2
fi

mkdir -p "$OUT/logs" || die "cannot create $OUT"
OUT="$(cd "$OUT" && pwd)"
CORES="$(nproc 2>/dev/null || echo 2)"
THREADS="${RAYON_NUM_THREADS:-$((CORES / JOBS > 0 ? CORES / JOBS : 1))}"

finished() { grep -qs '"outcome": *"finished"' "$1/summary.json"; }

# cmd_for ENTRY: sets NAME, DIR, CMD (array) for a plan entry; RESUME=1 when it continues a run.
cmd_for() {
    local ds seed cost flags
    IFS='|' read -r NAME ds seed cost flags <<<"$1"
    DIR="$OUT/$NAME"
    RESUME=0
    [ -f "$DIR/last.safetensors" ] && RESUME=1
    # shellcheck disable=SC2206  # flags are space-separated words without spaces
    local f=($flags)
    CMD=("$BIN" train --data "$DATA_ROOT/$ds" --preset fast --epochs "$EPOCHS" --device "$DEVICE"
        --seed "$seed" "${f[@]}" "${SETS[@]}" --out "$DIR")
    [ "$RESUME" = 1 ] && CMD+=(--resume)
}

echo "results-table: ${#PLAN[@]} runs ($DATASET), device $DEVICE, $EPOCHS epochs, $JOBS at once, RAYON_NUM_THREADS=$THREADS, out $OUT"
TODO=()
for e in "${PLAN[@]}"; do
    cmd_for "$e"
    if [ -f "$DIR/config.toml" ]; then
        # A run directory of another schedule is not continued (its cosine decay spans its own
        # epochs) nor reported as this one: the settings of a table belong to its --out.
        was=$(sed -n 's/^epochs = \([0-9]*\)$/\1/p' "$DIR/config.toml")
        [ "$was" = "$EPOCHS" ] || die "$DIR was trained with epochs = ${was:-?}, not $EPOCHS: use another --out for another schedule"
    fi
    if finished "$DIR"; then
        echo "  done     $NAME"
        continue
    fi
    if [ "$RESUME" = 1 ]; then
        # Epochs done = lines of metrics.jsonl (one per finished epoch).
        echo "  resume   $NAME ($(wc -l <"$DIR/metrics.jsonl" 2>/dev/null || echo 0)/$EPOCHS epochs done)"
    else
        echo "  train    $NAME"
    fi
    if [ "$DRY" = 1 ]; then
        printf '          '
        printf ' %q' "${CMD[@]}"
        echo
    fi
    TODO+=("$e")
done
if [ ${#TODO[@]} -gt 1 ]; then # longest first
    mapfile -t TODO < <(printf '%s\n' "${TODO[@]}" | sort -s -t'|' -k4,4nr)
fi
if [ -n "$FIRST" ]; then # --first: the named runs move to the front, in the order given
    IFS=',' read -r -a firsts <<<"$FIRST"
    front=() rest=("${TODO[@]}")
    for f in "${firsts[@]}"; do
        known=0
        for e in "${PLAN[@]}"; do [ "${e%%|*}" = "$f" ] && known=1; done
        [ "$known" = 1 ] || die "--first: no run named '$f' in this plan (see --dry-run)"
        left=()
        for e in "${rest[@]}"; do
            if [ "${e%%|*}" = "$f" ]; then front+=("$e"); else left+=("$e"); fi
        done
        rest=("${left[@]}")
    done
    TODO=("${front[@]}" "${rest[@]}")
fi
if [ "$DRY" = 1 ]; then
    echo "order:$(for e in "${TODO[@]}"; do printf ' %s' "${e%%|*}"; done)"
    exit 0
fi
[ -d "$DATA_ROOT" ] || die "--data-root $DATA_ROOT: no such folder"

# ------------------------------------------------------------------ scheduler ----
declare -A PID_NAME=()
STOP=0
FAILED=0
T0=$(date +%s)
# shellcheck disable=SC2317  # called by the trap
on_signal() {
    STOP=1
    echo "results-table: stopping (signal): running trainings get SIGTERM and write a checkpoint" >&2
}
trap on_signal TERM INT

stop_all() {
    local p
    for p in "${!PID_NAME[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
}

reap() { # collects exited trainings
    local p rc
    for p in "${!PID_NAME[@]}"; do
        if ! kill -0 "$p" 2>/dev/null; then
            wait "$p"
            rc=$?
            local n=${PID_NAME[$p]}
            unset "PID_NAME[$p]"
            echo "$rc" >"$OUT/logs/$n.rc"
            if [ "$rc" = 0 ] && finished "$OUT/$n"; then
                echo "  finished $n ($(($(date +%s) - T0)) s since start)"
            elif [ "$rc" = 0 ]; then
                echo "  stopped  $n (checkpoint written; run again to continue)"
            else
                echo "  FAILED   $n (rc $rc): see $OUT/logs/$n.log" >&2
                tail -n 5 "$OUT/logs/$n.log" | sed 's/^/           /' >&2
                FAILED=1
            fi
        fi
    done
}

i=0
while :; do
    reap
    if [ "$STOP" = 0 ] && [ "$BUDGET" -gt 0 ] && [ $(($(date +%s) - T0)) -ge "$BUDGET" ]; then
        echo "results-table: --budget $BUDGET s reached: stopping the running trainings"
        STOP=1
    fi
    if [ "$STOP" = 1 ]; then
        stop_all
        [ ${#PID_NAME[@]} -eq 0 ] && break
        sleep 1
        continue
    fi
    if [ "$i" -ge ${#TODO[@]} ] && [ ${#PID_NAME[@]} -eq 0 ]; then break; fi
    if [ "$i" -lt ${#TODO[@]} ] && [ ${#PID_NAME[@]} -lt "$JOBS" ]; then
        cmd_for "${TODO[$i]}"
        i=$((i + 1))
        if [ "$RESUME" = 0 ] && [ -e "$DIR" ]; then
            # Died before its first checkpoint: keep what it left, start again.
            mv "$DIR" "$DIR.stale-$(date +%Y%m%d-%H%M%S)"
        fi
        if [ "$RESUME" = 1 ] && ! grep -qsx "$NAME" "$OUT/resumed.txt"; then
            echo "$NAME" >>"$OUT/resumed.txt"
        fi
        printf '%q ' "${CMD[@]}" >>"$OUT/commands.txt"
        echo >>"$OUT/commands.txt"
        RAYON_NUM_THREADS="$THREADS" "${CMD[@]}" >>"$OUT/logs/$NAME.log" 2>&1 </dev/null &
        PID_NAME[$!]=$NAME
        echo "  started  $NAME (pid $!)"
        continue
    fi
    sleep 2
done
trap - TERM INT

# ------------------------------------------------------------------ table ----
DIRS=()
RESUMED=()
UNFINISHED=0
for e in "${PLAN[@]}"; do
    cmd_for "$e"
    [ -e "$DIR" ] && DIRS+=("$DIR")
    finished "$DIR" || UNFINISHED=1
    grep -qsx "$NAME" "$OUT/resumed.txt" && RESUMED+=("$NAME")
done
if [ ${#DIRS[@]} -eq 0 ]; then
    echo "results-table: no run directory to report" >&2
    exit 1
fi
NOTE="Produced by \`tools/results-table.sh --dataset $DATASET --device $DEVICE --epochs $EPOCHS --jobs $JOBS\`${SETS[*]:+ (${SETS[*]})}: up to $JOBS trainings ran at once, so wall times include that sharing."
if "$BIN" report --markdown --skip-bad "${DIRS[@]}" >"$OUT/table.md.tmp"; then
    printf '\n%s\n' "$NOTE" >>"$OUT/table.md.tmp"
    if [ ${#RESUMED[@]} -gt 0 ]; then
        # summary.json's wall_seconds sums the invocations (kept in the checkpoints).
        printf '\nRuns continued after a stop (wall time summed over their invocations): %s.\n' \
            "$(printf '%s, ' "${RESUMED[@]}" | sed 's/, $//')" >>"$OUT/table.md.tmp"
    fi
    mv "$OUT/table.md.tmp" "$OUT/table.md"
    "$BIN" report --json --skip-bad "${DIRS[@]}" >"$OUT/table.json" 2>/dev/null
    "$BIN" report --skip-bad "${DIRS[@]}" 2>/dev/null | tee "$OUT/table.txt"
    echo "results-table: wrote $OUT/table.md, table.json, table.txt"
else
    echo "results-table: medssl report failed" >&2
    FAILED=1
fi
if [ "$FAILED" = 1 ]; then exit 1; fi
if [ "$UNFINISHED" = 1 ]; then
    echo "results-table: some runs are not finished; run the same command again to continue them"
    exit 3
fi
exit 0
}
