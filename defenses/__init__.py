"""vlbench's built-in defenses: one module (or package, such as ``nn/``) per defense, found by
name and imported only when used; code that serves one defense lives beside it."""
