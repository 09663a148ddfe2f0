#![no_main]
libfuzzer_sys::fuzz_target!(
    init: {
        // libFuzzer's main, unlike Rust's, leaves SIGPIPE fatal: a write to a
        // connection the server closed must be an error, not the end.
        // SAFETY: setting a signal's disposition to "ignore" before any
        // thread that could race on it exists.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };
    },
    |data: &[u8]| hsmd_fuzzing::connection::run(data)
);
