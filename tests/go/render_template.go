// Renders an Ollama Modelfile TEMPLATE with Go's text/template, the engine Ollama uses, for tests/test_gguf.py.
// Reads {"template": ..., "system": ..., "prompt": ...} as JSON on stdin; writes the rendered text to stdout.
package main

import (
	"encoding/json"
	"os"
	"text/template"
)

type values struct {
	System   string
	Prompt   string
	Response string
}

func main() {
	var in struct {
		Template string `json:"template"`
		System   string `json:"system"`
		Prompt   string `json:"prompt"`
	}
	if err := json.NewDecoder(os.Stdin).Decode(&in); err != nil {
		panic(err)
	}
	t := template.Must(template.New("modelfile").Parse(in.Template))
	if err := t.Execute(os.Stdout, values{System: in.System, Prompt: in.Prompt}); err != nil {
		panic(err)
	}
}
