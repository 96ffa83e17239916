"""Engine backends (argv and env for vllm, embedding, command, fake: :mod:`.backends`), what a
request may put on their command lines (:mod:`.argv_policy`), and our own servers.

Nothing is imported here: our engine servers import this package and should start fast."""
