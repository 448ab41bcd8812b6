"""The `samselfprompt` command line."""
