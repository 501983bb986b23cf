#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| khub_fuzz::serve_request(data));
