package proxy

import (
	"errors"
	"go/build"
	"io/fs"
	"path/filepath"
	"strings"
	"testing"
)

const module = "github.com/credproxy/credproxy"

// layer ranks the module's packages: imports run from a higher layer to
// a lower one only (cmd → protocols → the engine → its leaves → config).
// Leaves may use each other; protocols may not use each other. Packages
// of no layer (integration tests, deploy checks, scripts) may import
// anything and are not checked.
func layer(pkg string) (rank int, ok bool) {
	switch {
	case pkg == "config":
		return 0, true
	case pkg == "identity", strings.HasPrefix(pkg, "identity/"), pkg == "proxy/credentials", pkg == "proxy/audit", pkg == "proxy/limit":
		return 1, true // leaves: every layer above may use them
	case pkg == "proxy":
		return 2, true // the engine
	case strings.HasPrefix(pkg, "protocols/"):
		return 3, true
	case strings.HasPrefix(pkg, "cmd/"):
		return 4, true
	}
	return 0, false
}

// Imports run one way: the engine imports no protocol, a leaf imports
// neither the engine nor a protocol, a protocol no other protocol, and
// nothing imports cmd. Test files are left out: proxy's external tests
// build servers with the real protocols.
func TestImportsRunOneWay(t *testing.T) {
	root, err := filepath.Abs("..")
	if err != nil {
		t.Fatal(err)
	}
	checked := 0
	err = filepath.WalkDir(root, func(dir string, d fs.DirEntry, err error) error {
		if err != nil || !d.IsDir() {
			return err
		}
		if name := d.Name(); dir != root && (strings.HasPrefix(name, ".") || name == "testdata" || name == "vendor") {
			return filepath.SkipDir
		}
		bp, err := build.ImportDir(dir, 0)
		var noGo *build.NoGoError
		if errors.As(err, &noGo) {
			return nil
		}
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(root, dir)
		pkg := filepath.ToSlash(rel)
		from, ok := layer(pkg)
		if !ok {
			return nil
		}
		checked++
		for _, imp := range bp.Imports {
			dep, inModule := strings.CutPrefix(imp, module+"/")
			if !inModule {
				continue
			}
			to, ok := layer(dep)
			switch {
			case !ok:
				t.Errorf("%s imports %s, which belongs to no layer", pkg, dep)
			case to > from, to == from && from != 1:
				t.Errorf("%s imports %s: imports must run from cmd to protocols to proxy to its leaves to config", pkg, dep)
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	// The walk found the layers: config, the leaves, the engine, two
	// protocols and the command at least.
	if checked < 9 {
		t.Errorf("checked %d packages; the walk missed some", checked)
	}
}
