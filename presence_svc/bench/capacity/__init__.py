"""The capacity calculator: inputs from bench figures, the model, the plan and its report."""
