"""The pure-PyTorch reference of every op: the specification every backend is tested against, and the
fallback on devices no kernel serves. fastprompt/reference/<op>.py implements the op declared in
fastprompt/ops/<op>.py on the `reference` backend; fastprompt.backends imports it the first time it is needed."""
