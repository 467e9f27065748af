//! Library target so that `lb-userspace` can declare a build-dependency on this crate (cargo
//! rebuilds it when this crate changes). The programs themselves live in the `lb-ebpf` binary.
#![no_std]
