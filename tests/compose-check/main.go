// compose-check validates docker-compose files the way `docker compose config` does, with the
// same library (compose-spec/compose-go): schema, interpolation, and cross-references. CI has
// no Docker engine and Debian's docker client lacks the compose plugin, so this stands in.
//
// Usage: compose-check FILE... (exit 1 with the loader's message on the first invalid file)
package main

import (
	"context"
	"fmt"
	"os"
	"path/filepath"

	"github.com/compose-spec/compose-go/v2/cli"
)

func main() {
	if len(os.Args) < 2 {
		fmt.Fprintln(os.Stderr, "usage: compose-check FILE...")
		os.Exit(2)
	}
	for _, file := range os.Args[1:] {
		abs, err := filepath.Abs(file)
		if err != nil {
			fail(file, err)
		}
		opts, err := cli.NewProjectOptions([]string{abs},
			cli.WithWorkingDirectory(filepath.Dir(abs)),
			cli.WithName("vncdispatch"),
			cli.WithResolvedPaths(true),
		)
		if err != nil {
			fail(file, err)
		}
		project, err := opts.LoadProject(context.Background())
		if err != nil {
			fail(file, err)
		}
		fmt.Printf("%s: valid; services: %v\n", file, project.ServiceNames())
	}
}

func fail(file string, err error) {
	fmt.Fprintf(os.Stderr, "%s: %v\n", file, err)
	os.Exit(1)
}
