#!/usr/bin/env bash
# Side-by-side timing of fedleak's ViT steps against the PyTorch reference harness
# (tests/bench/torch_vit_ig.py), alternating the two implementations in the same run
# (torch, fedleak, torch, fedleak, ...) so both see the same machine load.
#
# For each case it reports the median step time of each side, the median of the per-round ratios
# fedleak/torch, and the peak RSS of each side (max over rounds, from /usr/bin/time -v).
#
# Environment:
#   FEDLEAK       fedleak binary (default: ${CARGO_TARGET_DIR:-<repo>/target}/release/fedleak)
#   TORCH_PYTHON  python with torch + safetensors (default: /work/venv-torch/bin/python)
#   ROUNDS        alternations per case (default: 5)
#   CASES         space-separated subset of: train-small-1 train-small-8 attack-small-1
#                 attack-small-8 attack-vitb-1 train-vitb-1 restarts2-small-1 restarts2-small-8
#                 (default: all, in that order). `restarts2-*` times fedleak's attack step as its
#                 concurrent restarts run it (two steps at once, one kernel thread each; the time is
#                 per step, wall time / 2) against torch's one step on two threads.
#   ITERS         timed iterations per process, overriding the per-case default (20/10/3)
#   WARMUP        untimed iterations per process, overriding the per-case default (3 small, 1 vitb)
#   RUN_TIMEOUT   seconds before one process is killed and its case marked FAILED (default: 1800)
#   KEEP_LOGS     directory to keep every run's stdout/stderr/time output in (default: a temp dir,
#                 removed at exit)
#
# Both sides run on 2 threads: the reference calls torch.set_num_threads(2); fedleak gets --threads 2.
# Exit status: 0 when every case produced numbers, 1 when some case FAILED, 2 on a setup error.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
anchor="$here/torch_vit_ig.py"

FEDLEAK="${FEDLEAK:-${CARGO_TARGET_DIR:-$repo/target}/release/fedleak}"
TORCH_PYTHON="${TORCH_PYTHON:-/work/venv-torch/bin/python}"
ROUNDS="${ROUNDS:-5}"
ALL_CASES="train-small-1 train-small-8 attack-small-1 attack-small-8 attack-vitb-1 train-vitb-1 restarts2-small-1 restarts2-small-8"
CASES="${CASES:-$ALL_CASES}"
RUN_TIMEOUT="${RUN_TIMEOUT:-1800}"
TIME_BIN=/usr/bin/time

die() { echo "compare_torch.sh: error: $*" >&2; exit 2; }
log() { echo "[$(date +%T)] $*" >&2; }

# ---------------------------------------------------------------- setup checks
[[ "$ROUNDS" =~ ^[1-9][0-9]*$ ]] || die "ROUNDS must be a positive integer, got '$ROUNDS'"
[[ -z "${ITERS:-}" || "$ITERS" =~ ^[1-9][0-9]*$ ]] || die "ITERS must be a positive integer, got '$ITERS'"
[[ -z "${WARMUP:-}" || "$WARMUP" =~ ^[0-9]+$ ]] || die "WARMUP must be a non-negative integer, got '$WARMUP'"
for c in $CASES; do
    [[ " $ALL_CASES " == *" $c "* ]] || die "unknown case '$c' (known: $ALL_CASES)"
done
[[ -n "${CASES// /}" ]] || die "CASES is empty"

[[ -x "$TIME_BIN" ]] && "$TIME_BIN" -v true >/dev/null 2>&1 \
    || die "$TIME_BIN (GNU time, with -v) is missing: apt-get update && apt-get install -y time"
[[ -f "$anchor" ]] || die "reference harness $anchor is missing"
[[ -x "$TORCH_PYTHON" ]] || command -v "$TORCH_PYTHON" >/dev/null 2>&1 \
    || die "TORCH_PYTHON=$TORCH_PYTHON not found; install the reference as in tests/bench/README.md"
torch_version="$("$TORCH_PYTHON" -c 'import torch; print(torch.__version__)' 2>/dev/null)" \
    || die "'$TORCH_PYTHON' cannot import torch; install the reference as in tests/bench/README.md"

[[ -x "$FEDLEAK" ]] || die "fedleak binary '$FEDLEAK' not found or not executable (cargo build --release, or set FEDLEAK)"
if ! bench_help="$("$FEDLEAK" bench --help 2>&1)"; then
    die "'$FEDLEAK' has no working 'bench' command (this build predates it?): $(printf '%s' "$bench_help" | head -n 3)"
fi
for opt in --step --model --batch --iters --threads; do
    grep -q -- "$opt" <<<"$bench_help" \
        || die "'$FEDLEAK bench' lacks the $opt option this script needs (this build predates it?)"
done
fedleak_has_warmup=0
if grep -q -- '--warmup' <<<"$bench_help"; then fedleak_has_warmup=1; fi

if [[ -n "${KEEP_LOGS:-}" ]]; then
    workdir="$KEEP_LOGS"; mkdir -p "$workdir"
else
    workdir="$(mktemp -d "${TMPDIR:-/tmp}/compare_torch.XXXXXX")"
    trap 'rm -rf "$workdir"' EXIT
fi

# ---------------------------------------------------------------- helpers
# median of the numbers given as arguments
median() {
    printf '%s\n' "$@" | sort -g | awk '{a[NR]=$1} END {
        if (NR == 0) { print "NA"; exit }
        if (NR % 2) printf "%.2f\n", a[(NR+1)/2]; else printf "%.2f\n", (a[NR/2] + a[NR/2+1]) / 2 }'
}
max_of() { printf '%s\n' "$@" | sort -g | tail -n 1; }
# KiB -> MiB, rounded
mib() { awk -v k="$1" 'BEGIN { if (k == "NA") print "NA"; else printf "%.0f", k / 1024 }'; }

# run_one LABEL METRIC -- CMD...: runs CMD under /usr/bin/time -v; on success prints "MS RSS_KB".
run_one() {
    local label="$1" metric="$2"; shift 3
    local out="$workdir/$label.out" err="$workdir/$label.err" tv="$workdir/$label.time"
    local rc=0
    timeout "$RUN_TIMEOUT" "$TIME_BIN" -v -o "$tv" "$@" >"$out" 2>"$err" || rc=$?
    local result ms rss
    result="$(grep '^RESULT ' "$out" | tail -n 1 || true)"
    ms="$(grep -o "\b$metric=[0-9.eE+-]*" <<<"$result" | head -n 1 | cut -d= -f2 || true)"
    rss="$(sed -n 's/.*Maximum resident set size (kbytes): *\([0-9]*\).*/\1/p' "$tv" 2>/dev/null | tail -n 1 || true)"
    if (( rc != 0 )) || ! [[ "$ms" =~ ^[0-9.eE+-]+$ ]]; then
        {
            echo "  $label FAILED (exit $rc${result:+, RESULT: $result}${result:-, no RESULT line}; wanted $metric)"
            echo "  command: $*"
            tail -n 5 "$err" 2>/dev/null | sed 's/^/  | /'
        } >&2
        return 1
    fi
    echo "$ms ${rss:-NA}"
}

# ---------------------------------------------------------------- main loop
log "fedleak=$FEDLEAK torch=$torch_version ($TORCH_PYTHON) rounds=$ROUNDS nproc=$(nproc) loadavg=$(cut -d' ' -f1-3 /proc/loadavg)"
if awk -v l="$(cut -d' ' -f1 /proc/loadavg)" 'BEGIN { exit !(l > 1.0) }'; then
    log "WARNING: 1-min load average above 1 before starting: other work shares the 2 cores. Under" \
        "contention the torch side has shown multi-second stalls per iteration; prefer a quiet machine."
fi
declare -a table=()
any_failed=0

for case in $CASES; do
    IFS=- read -r step model batch <<<"$case"
    case "$model" in
        small) fl_model=vit-tiny-32; def_iters=$(( batch == 1 ? 20 : 10 )); def_warmup=3 ;;
        vitb)  fl_model=vit-b16-224; def_iters=3; def_warmup=1 ;;
    esac
    iters="${ITERS:-$def_iters}"; warmup="${WARMUP:-$def_warmup}"
    if [[ "$step" == train ]]; then torch_metric=fwd_bwd1_median_ms; fl_metric=fwd_bwd1_median_ms
    else torch_metric=attack_iter_median_ms; fl_metric=attack_iter_median_ms; fi

    torch_cmd=("$TORCH_PYTHON" "$anchor" bench "$batch" "$iters" "$model" "$warmup")
    if [[ "$step" == restarts2 ]]; then
        fl_cmd=("$FEDLEAK" bench --step attack --concurrent 2 --model "$fl_model" --batch "$batch" --iters "$iters" --threads 1)
    else
        fl_cmd=("$FEDLEAK" bench --step "$step" --model "$fl_model" --batch "$batch" --iters "$iters" --threads 2)
    fi
    if (( fedleak_has_warmup )); then fl_cmd+=(--warmup "$warmup"); fi

    log "case $case: $ROUNDS rounds of torch ($torch_metric) / fedleak ($fl_metric), iters=$iters warmup=$warmup"
    t_ms=(); f_ms=(); ratios=(); t_rss=(); f_rss=(); failed=""
    for (( r = 1; r <= ROUNDS; r++ )); do
        if ! t="$(run_one "$case.r$r.torch" "$torch_metric" -- "${torch_cmd[@]}")"; then failed="torch"; break; fi
        if ! f="$(run_one "$case.r$r.fedleak" "$fl_metric" -- "${fl_cmd[@]}")"; then failed="fedleak"; break; fi
        read -r tm tr <<<"$t"; read -r fm fr <<<"$f"
        t_ms+=("$tm"); f_ms+=("$fm"); t_rss+=("$tr"); f_rss+=("$fr")
        ratios+=("$(awk -v a="$fm" -v b="$tm" 'BEGIN { printf "%.4f", (b > 0 ? a / b : 0) }')")
        log "  round $r: torch ${tm} ms (${tr} KiB)  fedleak ${fm} ms (${fr} KiB)  ratio ${ratios[-1]}  load $(cut -d' ' -f1 /proc/loadavg)"
    done
    if [[ -n "$failed" ]]; then
        any_failed=1
        table+=("$case|FAILED ($failed)|-|-|-|-")
        continue
    fi
    table+=("$case|$(median "${t_ms[@]}")|$(median "${f_ms[@]}")|$(median "${ratios[@]}")|$(mib "$(max_of "${t_rss[@]}")")|$(mib "$(max_of "${f_rss[@]}")")")
done

# ---------------------------------------------------------------- report
echo
echo "# fedleak vs PyTorch $torch_version, $ROUNDS alternating rounds, 2 threads, nproc=$(nproc), loadavg at end $(cut -d' ' -f1-3 /proc/loadavg), $(date -u +%Y-%m-%dT%H:%MZ)"
{
    echo "case|torch_median_ms|fedleak_median_ms|median_ratio_fedleak/torch|torch_peak_rss_MiB|fedleak_peak_rss_MiB"
    printf '%s\n' "${table[@]}"
} | column -t -s '|'
echo "(train-* compares fwd_bwd1_median_ms, attack-* attack_iter_median_ms; the torch process runs both steps in every iteration, so its peak RSS for train-* includes the attack step's)"
exit $any_failed
