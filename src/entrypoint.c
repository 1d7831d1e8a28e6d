// The Rust static library registers its routines in R_init_fedagg_extendr.
// Calling it from here keeps the linker from dropping the library, and the
// panic hook keeps Rust panic messages off the console (they become R errors).
void R_init_fedagg_extendr(void *dll);
void register_extendr_panic_hook(void);

void R_init_fedagg(void *dll) {
    register_extendr_panic_hook();
    R_init_fedagg_extendr(dll);
}
