"""attnc IR: nodes and their printer, lowering from the AST, binding, expression evaluation and
integer ranges. Nothing here depends on analysis, codegen or the backends."""
