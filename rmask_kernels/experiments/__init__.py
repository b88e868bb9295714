"""The paper's experiments as a tool: data, training, transfer attacks and evaluation."""
