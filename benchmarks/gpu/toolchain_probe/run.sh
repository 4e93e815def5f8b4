#!/bin/bash
# Found on the lent H200 image (Ubuntu 24.04, g++ 13.3, libstdc++ 6.0.33, torch 2.11.0+cu130): a torch
# extension built there, even this plain one, segfaults when an integer is streamed into an error
# message (std::ostream::_M_insert<long> reaches a codecvt vtable slot). Results in
# benchmarks/results/gpu_h200/int_format_probe.log. Run: bash benchmarks/gpu/toolchain_probe/run.sh
# int-formatting crash probe (device): tiny extensions with our flags vs plain, and lenserve's op under a native backtrace
cd "$(dirname "$0")/../../.."
g++ --version | head -1; python -c 'import torch; print(torch.__version__, torch._C._GLIBCXX_USE_CXX11_ABI)'; lscpu | grep 'Model name'
gcc -shared -fPIC -o /tmp/segv.so benchmarks/gpu/toolchain_probe/segv.c
mkdir -p /tmp/pb
build_probe() { python benchmarks/gpu/toolchain_probe/probe.py "$1" "$2" fmt > /tmp/pb/$1.build 2>&1; echo "$1 build rc=$? $(tail -1 /tmp/pb/$1.build)"; }
build_probe plain "" &
build_probe ours "-O3 -fopenmp -fno-math-errno -march=x86-64-v3" &
build_probe omp "-fopenmp" &
build_probe march "-march=x86-64-v3" &
( TORCH_CUDA_ARCH_LIST=9.0 LENSERVE_CUDA=1 MAX_JOBS=12 python -m pip install --no-deps --no-build-isolation --no-index -e . > /tmp/pb/lenserve_build.log 2>&1; echo "lenserve build rc=$?" ) &
wait
for v in plain ours omp march; do for w in str int op; do
  LD_PRELOAD=/tmp/segv.so timeout 60 python benchmarks/gpu/toolchain_probe/probe.py $v "" $w 2>&1 | grep -v Warning | tail -4; echo "  -> $v $w rc=${PIPESTATUS[0]}"
done; done
grep -o 'march=[^ ]*\|fvisibility[^ ]*' build/temp*/build.ninja | sort | uniq -c
cat > /tmp/pb/crash.py <<'P'
import torch, lenserve._C
q = torch.randn(8, 4, 96, device="cuda", dtype=torch.bfloat16); k = torch.randn(8, 2, 64, device="cuda", dtype=torch.bfloat16)
cu = torch.tensor([0, 3, 8], dtype=torch.int32, device="cuda")
try:
    torch.ops.lenserve.varlen_attention(q, k, k, cu, cu, 5, 5, 0.125, True)
except RuntimeError as e: print("raised:", str(e).splitlines()[0])
P
LD_PRELOAD=/tmp/segv.so timeout 60 python /tmp/pb/crash.py 2>&1 | tail -40; echo "lenserve crash rc=${PIPESTATUS[0]}"
grep -n 'libstdc\|libgomp' /proc/self/maps | head -3
python - <<'P'
import torch, lenserve._C, re
maps = open("/proc/self/maps").read()
print(sorted(set(re.findall(r"\S*(?:libstdc\+\+|libgomp|libgcc_s)\S*", maps))))
P
