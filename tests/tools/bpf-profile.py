#!/usr/bin/env python3
"""Where the load balancer's time goes on one packet path, by source: perf's samples in the
XDP program's JIT image, mapped back through the kernel's line info (BTF) to the Rust lines
they came from.

    tests/tools/bpf-profile.py CASE [--by concern|file|line] [--top N]

Runs `lb-bench` in its spin mode (`BENCH_ONLY=spin BENCH_CASE=CASE`: non-vip, established,
established-table, syn) pinned to CPU 1 under `perf record -e cpu-clock`, reads the loaded
`lb_xdp`'s line table while it runs, then prints the split of the run's samples (the
program's own code, the kernel's flow-table functions, the test-run loop around them) with
the spin mode's ns per pass, and each concern's (or source file's, or line's) share of the
program's own samples. cpu-clock samples skid a few instructions past a stall, so a line's share is
approximate; a concern's is close. Needs root, perf and bpftool; build first
(`cargo build --release --all-targets`).
"""
import ctypes
import os
import re
import struct
import subprocess
import sys
import tempfile
import time
from bisect import bisect_right
from collections import Counter

SYS_BPF = 321  # x86-64
BPF_PROG_GET_FD_BY_ID = 13
BPF_OBJ_GET_INFO_BY_FD = 15
INFO_SIZE = 256  # bytes of struct bpf_prog_info this script reads (kernels since 5.x)

libc = ctypes.CDLL(None, use_errno=True)


def bpf(cmd, attr):
    buf = ctypes.create_string_buffer(attr, 128)
    r = libc.syscall(SYS_BPF, cmd, buf, 128)
    if r < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"bpf({cmd}): {os.strerror(err)}")
    return r


def prog_info(fd, info):
    bpf(BPF_OBJ_GET_INFO_BY_FD, struct.pack("IIQ", fd, INFO_SIZE, ctypes.addressof(info)))


def line_table(prog_id):
    """(JIT offsets, xlated insn offsets) of the program's line info records, in order."""
    fd = bpf(BPF_PROG_GET_FD_BY_ID, struct.pack("I", prog_id))
    try:
        return read_line_table(fd)
    finally:
        os.close(fd)


def read_line_table(fd):
    info = ctypes.create_string_buffer(INFO_SIZE)
    prog_info(fd, info)
    nr_line, = struct.unpack_from("I", info, 148)
    nr_jited, = struct.unpack_from("I", info, 168)
    line_rec, jited_rec = struct.unpack_from("II", info, 172)
    ksyms_n, = struct.unpack_from("I", info, 104)
    if nr_line == 0 or nr_jited == 0:
        sys.exit("the program has no line info (loaded without BTF?)")
    lines = ctypes.create_string_buffer(nr_line * line_rec)
    jited = ctypes.create_string_buffer(nr_jited * jited_rec)
    ksyms = ctypes.create_string_buffer(max(ksyms_n, 1) * 8)
    info2 = ctypes.create_string_buffer(INFO_SIZE)
    struct.pack_into("I", info2, 104, ksyms_n)
    struct.pack_into("Q", info2, 112, ctypes.addressof(ksyms))
    struct.pack_into("I", info2, 148, nr_line)
    struct.pack_into("Q", info2, 152, ctypes.addressof(lines))
    struct.pack_into("Q", info2, 160, ctypes.addressof(jited))
    struct.pack_into("I", info2, 168, nr_jited)
    struct.pack_into("II", info2, 172, line_rec, jited_rec)
    prog_info(fd, info2)
    start, = struct.unpack_from("Q", ksyms, 0)
    jit = [struct.unpack_from("Q", jited, i * jited_rec)[0] - start for i in range(nr_jited)]
    insn = [struct.unpack_from("I", lines, i * line_rec)[0] for i in range(nr_line)]
    return jit, insn


def xlated_sources(prog_id):
    """Source line ("file:line") of each xlated instruction offset, from bpftool's dump."""
    dump = subprocess.run(
        ["bpftool", "prog", "dump", "xlated", "id", str(prog_id), "linum"],
        check=True, capture_output=True, text=True,
    ).stdout
    src, by_insn = None, {}
    for line in dump.splitlines():
        m = re.search(r"\[file:(\S+) line_num:(\d+)", line)
        if line.startswith(";") and m:
            path = m.group(1)
            short = "/".join(path.split("/")[-2:])
            src = f"{short}:{m.group(2)}"
            continue
        m = re.match(r"\s*(\d+):", line)
        if m and src:
            by_insn[int(m.group(1))] = src
    return by_insn


def samples(perf_data, prog_name):
    out = subprocess.run(
        ["perf", "script", "-i", perf_data, "-F", "ip,sym,symoff"],
        check=True, capture_output=True, text=True,
    ).stdout
    offs = Counter()
    for line in out.splitlines():
        m = re.search(r"bpf_prog_[0-9a-f]+_" + re.escape(prog_name) + r"\+0x([0-9a-f]+)", line)
        if m:
            offs[int(m.group(1), 16)] += 1
    return offs


KERNEL_TABLE = re.compile(r"htab|lookup_nulls|lru|jhash|memcmp")
TEST_RUN_LOOP = {
    "bpf_test_run", "bpf_test_timer_continue", "__local_bh_enable_ip",
    "bpf_dispatcher_xdp_func", "srso_alias_return_thunk", "srso_alias_safe_ret",
}


def split(perf_data, prog_name):
    """Samples of the program, of the kernel's table functions and of the test-run loop."""
    out = subprocess.run(
        ["perf", "report", "-i", perf_data, "--sort", "sym", "--stdio", "-F", "sample,sym"],
        check=True, capture_output=True, text=True,
    ).stdout
    parts = Counter()
    for line in out.splitlines():
        m = re.match(r"\s*(\d+)\s+\[k\]\s+(\S+)", line)
        if not m:
            continue
        n, sym = int(m.group(1)), m.group(2)
        if re.match(r"bpf_prog_[0-9a-f]+_" + re.escape(prog_name) + "$", sym):
            parts["program"] += n
        elif KERNEL_TABLE.search(sym):
            parts["flow table (kernel)"] += n
        elif sym in TEST_RUN_LOOP:
            parts["test-run loop"] += n
    return parts


# Source files (as "dir/file") by concern; the rest are named as they are.
CONCERNS = {
    "x86_64/helpers.rs": "map lookups (key through the stack, bounds and null checks)",
    "maps/array.rs": "map lookups (key through the stack, bounds and null checks)",
    "maps/per_cpu_array.rs": "map lookups (key through the stack, bounds and null checks)",
    "ptr/non_null.rs": "map lookups (key through the stack, bounds and null checks)",
    "src/parse.rs": "parsing (header reads, bounds checks)",
    "src/ptr.rs": "parsing (header reads, bounds checks)",
    "programs/xdp.rs": "parsing (header reads, bounds checks)",
    "convert/num.rs": "parsing (header reads, bounds checks)",
    "src/lib.rs": "lb-common (hashes, keys, entry rules)",
    "src/flow.rs": "lb-common (hashes, keys, entry rules)",
    "src/cache.rs": "lb-common (hashes, keys, entry rules)",
    "src/nat.rs": "lb-common (hashes, keys, entry rules)",
    "src/select.rs": "selection (select, express)",
    "src/express.rs": "selection (select, express)",
    "src/stats.rs": "counters (increments)",
    "src/forward.rs": "rewrite and send (forward, encap)",
    "src/maps.rs": "map wrappers (VIP-filter bit, VIP id search, slot index)",
    "ptr/mod.rs": "core (pointer and integer operations)",
    "num/uint_macros.rs": "core (pointer and integer operations)",
    "src/result.rs": "core (pointer and integer operations)",
    "array/equality.rs": "core (pointer and integer operations)",
    "src/internal_macros.rs": "core (pointer and integer operations)",
    "src/encap.rs": "rewrite and send (forward, encap)",
}


def concern(where):
    """The concern of a "dir/file:line"; the program's entry line is its prologue."""
    path, _, line = where.rpartition(":")
    if path == "src/main.rs" and line == "79":
        return "entry and exit (stack frame, tail-call count, saved registers)"
    return CONCERNS.get(path, path)


def newest_prog(name):
    out = subprocess.run(["bpftool", "prog", "show", "name", name], capture_output=True,
                         text=True).stdout
    ids = [int(m) for m in re.findall(r"^(\d+):", out, re.M)]
    return max(ids) if ids else None


def main():
    args = sys.argv[1:]
    if not args or args[0].startswith("-"):
        sys.exit(__doc__)
    case = args[0]
    by = args[args.index("--by") + 1] if "--by" in args else "concern"
    top = int(args[args.index("--top") + 1]) if "--top" in args else 25
    name = "lb_xdp"
    root = subprocess.run(["git", "rev-parse", "--show-toplevel"], check=True,
                          capture_output=True, text=True).stdout.strip()
    with tempfile.TemporaryDirectory() as tmp:
        data = f"{tmp}/perf.data"
        before = newest_prog(name) or 0
        env = dict(os.environ, BENCH_ONLY="spin", BENCH_CASE=case)
        run = subprocess.Popen(
            ["perf", "record", "-q", "-e", "cpu-clock", "-F", "10000", "-C", "1", "-o", data,
             "--", "taskset", "-c", "1", f"{root}/target/release/lb-bench"],
            env=env, stdout=subprocess.PIPE, text=True,
        )
        prog_id, deadline = None, time.monotonic() + 60
        while prog_id is None and run.poll() is None and time.monotonic() < deadline:
            newest = newest_prog(name)
            if newest and newest > before:
                prog_id = newest
            else:
                time.sleep(0.05)
        if prog_id is None:
            run.kill()
            sys.exit(f"{name} was not loaded (lb-bench: {run.wait()})")
        jit, insn = line_table(prog_id)
        src = xlated_sources(prog_id)
        result = run.communicate(timeout=300)[0].strip().splitlines()
        if run.returncode != 0:
            sys.exit(f"lb-bench failed ({run.returncode})")
        print(result[-1] if result else "", flush=True)
        parts = split(data, name)
        counted = sum(parts.values())
        ns = float(re.search(r": ([\d.]+) ns", result[-1]).group(1))
        for part, n in parts.most_common():
            print(f"  {part}: {100 * n / counted:.0f}% of the loop, ~{ns * n / counted:.1f} ns")
        order = sorted(range(len(jit)), key=lambda i: jit[i])
        starts = [jit[i] for i in order]
        total, shares = 0, Counter()
        for off, n in samples(data, name).items():
            k = bisect_right(starts, off) - 1
            where = src.get(insn[order[k]], "?") if k >= 0 else "?"
            if by == "file":
                where = where.rsplit(":", 1)[0]
            elif by == "concern":
                where = concern(where)
            shares[where] += n
            total += n
    if total == 0:
        sys.exit(f"no samples in {name}")
    print(f"{total} samples in {name}, by {by}:")
    for where, n in shares.most_common(top):
        print(f"{100 * n / total:5.1f}%  {where}")


if __name__ == "__main__":
    main()
