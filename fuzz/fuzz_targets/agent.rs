#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| hsmd_fuzzing::agent::run(data));
