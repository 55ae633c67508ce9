/* csrc/glibc_compat.h: keep the wheel's library within manylinux_2_28 (glibc 2.28) when it is built on a
 * newer glibc. Not included by any source: the wheel build force-includes it into every host compile
 * (setup.py adds `-include csrc/glibc_compat.h` for g++ and `--pre-include` for nvcc, which puts it into
 * both of nvcc's preprocessing passes but not into the final compile of the already-preprocessed host code).
 *
 * What a newer glibc adds to an otherwise glibc-2.28-clean library, and what this header does about it:
 *
 * 1. dlopen/dlsym/dlclose/... moved from libdl into libc in glibc 2.34 and got a new default version
 *    GLIBC_2.34 there; pthread_create/pthread_once/... likewise moved from libpthread. A link on glibc >= 2.34
 *    binds the new version, which glibc < 2.34 does not have. Each function below is also still exported under
 *    its original version, at the *same address* (a pure move, no change in behaviour; tests/test_wheel_symbols.py
 *    checks that against the build machine's libc.so.6), so `.symver` binds references to that original
 *    version instead: exactly what a link on glibc 2.28 would produce. On glibc < 2.34 the dynamic linker
 *    finds it in libdl.so.2/libpthread.so.0, which torch's libc10.so (a NEEDED of ours) always brings.
 *    Only functions whose old version is a plain alias are listed; anything else (stat@GLIBC_2.33,
 *    __isoc23_* of glibc 2.38, ...) is not papered over here and fails scripts/check_wheel.py instead.
 *
 * 2. libstdc++'s reference counting (ext/atomicity.h, used by shared_ptr, std::string's COW-free paths,
 *    locale, ...) reads glibc 2.32's `__libc_single_threaded` whenever <sys/single_threaded.h> exists, to skip
 *    atomics in single-threaded processes. Here it reads a constant `false` instead: always the atomic path,
 *    which is correct everywhere (the skip is only an optimisation) and needs no symbol at all.
 *
 * scripts/check_wheel.py fails a wheel whose library needs any GLIBC_/GLIBCXX_/CXXABI_ version newer than its
 * manylinux tag allows, so whatever this header does not cover is caught before a wheel ships.
 */
#ifndef DIFFKERN_GLIBC_COMPAT_H
#define DIFFKERN_GLIBC_COMPAT_H

#if defined(__linux__) && defined(__x86_64__)
#include <features.h> /* __GLIBC__, __GLIBC_MINOR__ */

#if defined(__GLIBC__) && !defined(__CUDA_ARCH__) && (__GLIBC__ > 2 || __GLIBC_MINOR__ >= 34)
/* Host code only: device compilation passes (__CUDA_ARCH__ defined) emit no host symbols. An unreferenced
 * name costs nothing: .symver only renames references the object actually makes. */
#define DIFFKERN_PIN_SYMBOL(name, version) __asm__(".symver " #name "," #name "@" #version)
/* libdl, merged into libc in 2.34 (x86_64 base version GLIBC_2.2.5) */
DIFFKERN_PIN_SYMBOL(dlopen, GLIBC_2.2.5);
DIFFKERN_PIN_SYMBOL(dlsym, GLIBC_2.2.5);
DIFFKERN_PIN_SYMBOL(dlvsym, GLIBC_2.2.5);
DIFFKERN_PIN_SYMBOL(dlclose, GLIBC_2.2.5);
DIFFKERN_PIN_SYMBOL(dlerror, GLIBC_2.2.5);
DIFFKERN_PIN_SYMBOL(dladdr, GLIBC_2.2.5);
DIFFKERN_PIN_SYMBOL(dladdr1, GLIBC_2.3.3);
DIFFKERN_PIN_SYMBOL(dlinfo, GLIBC_2.3.3);
DIFFKERN_PIN_SYMBOL(dlmopen, GLIBC_2.3.4);
/* libpthread, merged into libc in 2.34: what libstdc++'s <thread>, <mutex>, call_once and TLS keys use */
DIFFKERN_PIN_SYMBOL(pthread_create, GLIBC_2.2.5);
DIFFKERN_PIN_SYMBOL(pthread_join, GLIBC_2.2.5);
DIFFKERN_PIN_SYMBOL(pthread_detach, GLIBC_2.2.5);
DIFFKERN_PIN_SYMBOL(pthread_once, GLIBC_2.2.5);
DIFFKERN_PIN_SYMBOL(pthread_key_create, GLIBC_2.2.5);
DIFFKERN_PIN_SYMBOL(pthread_key_delete, GLIBC_2.2.5);
DIFFKERN_PIN_SYMBOL(pthread_getspecific, GLIBC_2.2.5);
DIFFKERN_PIN_SYMBOL(pthread_setspecific, GLIBC_2.2.5);
DIFFKERN_PIN_SYMBOL(pthread_mutex_trylock, GLIBC_2.2.5);
DIFFKERN_PIN_SYMBOL(pthread_mutex_timedlock, GLIBC_2.2.5);
DIFFKERN_PIN_SYMBOL(pthread_mutexattr_init, GLIBC_2.2.5);
DIFFKERN_PIN_SYMBOL(pthread_mutexattr_settype, GLIBC_2.2.5);
DIFFKERN_PIN_SYMBOL(pthread_mutexattr_destroy, GLIBC_2.2.5);
#undef DIFFKERN_PIN_SYMBOL
#endif /* glibc >= 2.34, host code */

#if defined(__cplusplus) && defined(__has_include)
#if __has_include(<sys/single_threaded.h>)
/* Declare the real one first (under its own name), then make every later mention read the constant. */
#include <sys/single_threaded.h>
#define __libc_single_threaded diffkern_glibc_compat_never_single_threaded
#if __cplusplus >= 201703L
inline constexpr char diffkern_glibc_compat_never_single_threaded = 0;
#else
static const char diffkern_glibc_compat_never_single_threaded = 0;
#endif
#endif
#endif /* C++ with <sys/single_threaded.h> */

#endif /* x86_64 Linux */
#endif /* DIFFKERN_GLIBC_COMPAT_H */
