"""Helpers shared by the tests (and the benchmarks), one of each; fixtures live in conftest.py.

ports: loopback ports. config: configs and model commands. http: request bodies, a raw HTTP/1.1
client, answer checks. processes: pid and process checks, what this process holds, polling. daemon:
a daemon or supervisor to test against. admin: the one way in for admin calls (the local admin
token). status: what a running daemon reports. echo: the echo backend alone. cli: the command line.
notify: systemd's end of NOTIFY_SOCKET. real_model: llama-server and the Gemma GGUF. assembly: the
assembler fed reads, compared with the OpenAI SDK. guard_parent: a stand-in daemon for the guard
(also run as a script). load_client: a light HTTP load client and /health probe, run as a script by
path.
"""
