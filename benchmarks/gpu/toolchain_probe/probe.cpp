#include <torch/extension.h>
#include <sstream>
void check_int(int64_t v) { TORCH_CHECK(v < 0, "value ", v, " must be negative"); }
void check_str(int64_t v) { TORCH_CHECK(v < 0, "value must be negative"); }
std::string fmt_int(int64_t v) { std::ostringstream ss; ss << v; return ss.str(); }
void op_check_int(const at::Tensor& x, int64_t v) { TORCH_CHECK(v < 0, "value ", v, " must be negative"); }
TORCH_LIBRARY_FRAGMENT(PROBE_NS, m) { m.def("check_int(Tensor x, int v) -> ()"); }
TORCH_LIBRARY_IMPL(PROBE_NS, CPU, m) { m.impl("check_int", &op_check_int); }
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("check_int", &check_int); m.def("check_str", &check_str); m.def("fmt_int", &fmt_int); }
