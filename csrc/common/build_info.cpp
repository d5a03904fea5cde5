// Build information embedded in mmkernels._C, read from the file's bytes by
// mmkernels/_cpp.py before the library is loaded: an extension compiled against one torch
// must never be dlopen'ed under another (the C++ ABI of libtorch is not stable across
// releases). setup.py passes the torch version it built against as MMK_TORCH_VERSION, a
// string literal. The marker "MMK_BUILT_WITH_TORCH=" must stay unique in the binary.
#ifndef MMK_TORCH_VERSION
#error "MMK_TORCH_VERSION (the torch version, a string literal) must be defined; build with setup.py"
#endif

extern "C" __attribute__((used, visibility("default"))) const char mmk_build_info[] =
    "MMK_BUILT_WITH_TORCH=" MMK_TORCH_VERSION;
