#!/usr/bin/env bash
# ckpt_ls must never die on what it is pointed at: each case runs the program on one
# hostile input (and a good file after it, which must still be listed) and checks one
# clear error line per bad input and the exit status. Run by ctest as
# example_ckpt_ls_<case> (examples/CMakeLists.txt):
#
#   ckpt_ls_cases.sh CKPT_LS CASE WORK_DIR GOOD_FILE
#
# CASE: directory | fifo | dev_zero | address_space | nul_name | orbax
set -u
ckpt_ls=$1 case=$2 work=$3 good=$4
rm -rf "$work" && mkdir -p "$work" || exit 2
out=$work/stdout err=$work/stderr

fail() { echo "ckpt_ls case $case: $*"; echo "--- stdout"; cat "$out"; echo "--- stderr"; cat "$err"; exit 1; }

# Runs ckpt_ls on the arguments (at most 60 s: a FIFO must not block it); sets $rc.
run() { timeout 60 "$ckpt_ls" "$@" >"$out" 2>"$err"; rc=$?; }

# The 8-byte little-endian length of $1, then $1: a safetensors header.
st_header() {
  local n=${#1} i
  for i in 0 1 2 3 4 5 6 7; do printf "\\x$(printf %02x $(((n >> (8 * i)) & 255)))"; done
  printf '%s' "$1"
}

# One bad input, then the good file: exit 1, exactly one error line naming the input
# and saying $2, and the good file still listed.
expect_one_bad() {
  local bad=$1 why=$2
  run "$bad" "$good"
  [[ $rc -eq 1 ]] || fail "exit status $rc, want 1"
  [[ $(wc -l <"$err") -eq 1 ]] || fail "want exactly one error line"
  grep -qF -- "$bad" "$err" || fail "the error line does not name $bad"
  grep -qF -- "$why" "$err" || fail "the error line does not say '$why'"
  grep -qF -- "$good: " "$out" || fail "the good file after it was not listed"
}

case $case in
  directory)
    mkdir "$work/dir"
    expect_one_bad "$work/dir" "not a regular file (a directory)"
    ;;
  fifo)
    mkfifo "$work/pipe" || exit 2
    expect_one_bad "$work/pipe" "not a regular file (a FIFO)"
    ;;
  dev_zero)
    ln -s /dev/zero "$work/zero.safetensors"
    expect_one_bad "$work/zero.safetensors" "not a regular file (a character device)"
    ;;
  address_space)
    # A valid 1 GiB safetensors file (sparse: one float32 tensor of 2^28 zeros) under a
    # 2 GiB address-space limit: it is read once, into its array, and listed.
    header='{"w":{"dtype":"F32","shape":[268435456],"data_offsets":[0,1073741824]}}'
    st_header "$header" >"$work/big.safetensors"
    truncate -s $((8 + ${#header} + 1073741824)) "$work/big.safetensors" || exit 2
    # 3 GiB of tensor cannot be allocated under that limit: reported, not an abort.
    header3='{"w":{"dtype":"F32","shape":[805306368],"data_offsets":[0,3221225472]}}'
    st_header "$header3" >"$work/huge.safetensors"
    truncate -s $((8 + ${#header3} + 3221225472)) "$work/huge.safetensors" || exit 2
    (ulimit -v $((2 * 1024 * 1024)) && exec timeout 120 "$ckpt_ls" "$work/big.safetensors" "$work/huge.safetensors" \
      "$good") >"$out" 2>"$err"
    rc=$?
    [[ $rc -eq 1 ]] || fail "exit status $rc, want 1 (the 3 GiB file fails, nothing aborts)"
    grep -qE '^w +float32 +\(268435456,\) +1073741824$' "$out" || fail "the 1 GiB file was not listed"
    [[ $(wc -l <"$err") -eq 1 ]] || fail "want exactly one error line"
    grep -qF "$work/huge.safetensors: out of memory" "$err" || fail "no out-of-memory line for the 3 GiB file"
    grep -qF -- "$good: " "$out" || fail "the good file after them was not listed"
    ;;
  nul_name)
    # A tensor name holding a NUL ("\u0000" in the JSON): shown escaped, not cut.
    header='{"a\u0000b":{"dtype":"X9","shape":[1],"data_offsets":[0,1]}}'
    { st_header '{"a\u0000b":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}'; printf '\007'; } >"$work/nul.safetensors"
    run "$work/nul.safetensors"
    [[ $rc -eq 0 ]] || fail "exit status $rc, want 0"
    grep -qF 'a\x00b  uint8  (1,)' "$out" || fail "the name is not shown as a\\x00b"
    # The same name in an error message: escaped too, and the message goes on after it.
    { st_header "$header"; printf '\007'; } >"$work/nul_bad.safetensors"
    expect_one_bad "$work/nul_bad.safetensors" "tensor 'a\x00b': unknown dtype 'X9'"
    ;;
  orbax)
    # Orbax checkpoint directories: one is listed (arrays, then their zarr storage); the
    # one whose data directory d/ was removed gets one error line naming the missing file.
    orbax=$(dirname "$(dirname "$good")")/orbax/v0_checkpoints/direct_checkpoint
    ok_dir=$orbax/checkpoint_metadata_present/pytree_checkpointable_has_metadata
    run "$ok_dir"
    [[ $rc -eq 0 ]] || fail "exit status $rc, want 0"
    grep -qF -- "$ok_dir: orbax" "$out" || fail "the Orbax checkpoint is not listed as orbax"
    grep -qE '^a +int32 +\(8,\) +32$' "$out" || fail "array a is not listed"
    grep -qE '^b/c +int32 +\(3,\) +12$' "$out" || fail "array b/c is not listed"
    grep -qE '^storage  a  zarr v2  chunks \(8,\)  .*zstd' "$out" || fail "the storage of a is not listed"
    expect_one_bad "$orbax/critical_metadata_alterations/missing_pytree_data_dir_d" "missing_pytree_data_dir_d/d"
    ;;
  *)
    echo "unknown case $case"
    exit 2
    ;;
esac
echo "ckpt_ls case $case: passed"
