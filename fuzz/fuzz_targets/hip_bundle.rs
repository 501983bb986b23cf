#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| khub_fuzz::hip_bundle(data));
