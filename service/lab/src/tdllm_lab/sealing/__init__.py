"""Writing sealed models (`writer.seal_checkpoint`) and the `tdllm seal` / `tdllm keygen` commands;
the reader that opens them is in the TD image (`tdllm.sealing.reader`)."""
