import subprocess, sys, os
variant, flags = sys.argv[1], sys.argv[2].split()
import torch
from torch.utils.cpp_extension import load
ns = f"probe_{variant}"
os.makedirs(f"/tmp/{ns}", exist_ok=True)
m = load(name=ns, sources=[os.path.join(os.path.dirname(__file__), "probe.cpp")], extra_cflags=flags + [f"-DPROBE_NS={ns}"],
         build_directory=f"/tmp/{ns}", verbose=False)
what = sys.argv[3]
try:
    if what == "fmt": print(variant, "fmt", m.fmt_int(5))
    elif what == "str": m.check_str(5)
    elif what == "int": m.check_int(5)
    elif what == "op": getattr(torch.ops, ns).check_int(torch.zeros(1), 5)
except RuntimeError as e:
    print(variant, what, "raised:", str(e).splitlines()[0])
