// Kernel registration for the CPU emulation (included by the generated per-file wrappers, after
// the kernel source). `emu::reg` records a kernel with a typed trampoline that unpacks the
// launch's argument array exactly as the CUDA driver does (one pointer per parameter, pointing
// at the parameter's value) and a checker that compares the launch's argument kinds and sizes
// with the kernel's signature, so an argument list that disagrees with the kernel is an error.
#pragma once

#include <stdio.h>

#include <type_traits>
#include <utility>

#include "cuda_emu.h"

namespace emu {

typedef void (*Invoke)(void* fn, void* const* args);
typedef bool (*Check)(const char* kinds, const size_t* sizes, int n, char* why, size_t why_len);

void add_kernel(const char* name, void* fn, Invoke invoke, Check check, bool direct);

// Argument kinds sent by the Rust side: 'P' device pointer, 'I' int, 'F' float, 'S' a by-value
// struct (its size in `sizes`).
template <class T>
bool kind_ok(char kind, size_t size) {
    if (std::is_pointer<T>::value) return kind == 'P' && size == sizeof(void*);
    if (std::is_same<T, int>::value) return kind == 'I' && size == 4;
    if (std::is_same<T, float>::value) return kind == 'F' && size == 4;
    if (std::is_class<T>::value) return kind == 'S' && size == sizeof(T);
    return false;
}

template <class T>
const char* kind_name() {
    if (std::is_pointer<T>::value) return "pointer";
    if (std::is_same<T, int>::value) return "int";
    if (std::is_same<T, float>::value) return "float";
    if (std::is_class<T>::value) return "struct";
    return "unsupported type";
}

template <class... A>
struct Sig {
    typedef void (*Fn)(A...);

    template <size_t... I>
    static void call(Fn f, void* const* args, std::index_sequence<I...>) {
        f(*static_cast<typename std::remove_cv<A>::type*>(args[I])...);
    }
    static void invoke(void* fn, void* const* args) {
        call(reinterpret_cast<Fn>(fn), args, std::index_sequence_for<A...>{});
    }

    template <size_t... I>
    static bool check_all(const char* kinds, const size_t* sizes, char* why, size_t why_len,
                          std::index_sequence<I...>) {
        bool ok = true;
        // Reports the first mismatching parameter.
        ((ok = ok && (kind_ok<A>(kinds[I], sizes[I]) ||
                      (snprintf(why, why_len,
                                "parameter %zu is a %s (%zu bytes) but the launch passes kind "
                                "'%c' (%zu bytes)",
                                I, kind_name<A>(), sizeof(A), kinds[I], sizes[I]),
                       false))),
         ...);
        return ok;
    }
    static bool check(const char* kinds, const size_t* sizes, int n, char* why, size_t why_len) {
        if (n != (int)sizeof...(A)) {
            snprintf(why, why_len, "the kernel has %zu parameters but the launch passes %d",
                     sizeof...(A), n);
            return false;
        }
        return check_all(kinds, sizes, why, why_len, std::index_sequence_for<A...>{});
    }
};

template <class... A>
void reg(const char* name, void (*f)(A...), bool direct) {
    add_kernel(name, reinterpret_cast<void*>(f), &Sig<A...>::invoke, &Sig<A...>::check, direct);
}

}  // namespace emu
