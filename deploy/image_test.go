package deploy

import (
	"debug/elf"
	"encoding/json"
	"io/fs"
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
)

// instruction is one Dockerfile instruction, continuation lines joined.
type instruction struct {
	Cmd  string // upper case
	Args string
}

func readDockerfile(t *testing.T) []instruction {
	t.Helper()
	data, err := os.ReadFile("Dockerfile")
	if err != nil {
		t.Fatal(err)
	}
	var out []instruction
	var cur strings.Builder
	for _, line := range strings.Split(string(data), "\n") {
		trimmed := strings.TrimSpace(line)
		if strings.HasPrefix(trimmed, "#") || (trimmed == "" && cur.Len() == 0) {
			continue
		}
		if rest, ok := strings.CutSuffix(trimmed, "\\"); ok {
			cur.WriteString(rest + " ")
			continue
		}
		cur.WriteString(trimmed)
		cmd, args, _ := strings.Cut(strings.TrimSpace(cur.String()), " ")
		out = append(out, instruction{strings.ToUpper(cmd), strings.TrimSpace(args)})
		cur.Reset()
	}
	return out
}

// finalStage returns the instructions from the last FROM on.
func finalStage(ins []instruction) []instruction {
	for i := len(ins) - 1; i >= 0; i-- {
		if ins[i].Cmd == "FROM" {
			return ins[i:]
		}
	}
	return nil
}

func jsonArray(t *testing.T, in instruction) []string {
	t.Helper()
	var v []string
	if err := json.Unmarshal([]byte(in.Args), &v); err != nil {
		t.Errorf("%s %s: use the JSON (exec) form: %v", in.Cmd, in.Args, err)
	}
	return v
}

// buildFlags are the go build settings the Dockerfile's build stage uses.
var ldflagsRE = regexp.MustCompile(`-ldflags\s+"([^"]*)"`)

func dockerfileBuild(t *testing.T, ins []instruction) (ldflags string) {
	t.Helper()
	for _, in := range ins {
		if in.Cmd != "RUN" || !strings.Contains(in.Args, "go build") {
			continue
		}
		for _, want := range []string{"CGO_ENABLED=0", "-trimpath", "./cmd/credproxy"} {
			if !strings.Contains(in.Args, want) {
				t.Errorf("the go build step lacks %s: %s", want, in.Args)
			}
		}
		m := ldflagsRE.FindStringSubmatch(in.Args)
		if m == nil {
			t.Fatalf("the go build step has no -ldflags \"...\": %s", in.Args)
		}
		for _, want := range []string{"-s", "-w", "-X main.version="} {
			if !strings.Contains(m[1], want) {
				t.Errorf("-ldflags %q lacks %s", m[1], want)
			}
		}
		return m[1]
	}
	t.Fatal("the Dockerfile has no go build step")
	return ""
}

// TestDockerfile lints the image definition: a static base, a numeric
// non-root user, the entrypoint and command of the interface, and nothing in
// the runtime stage that needs a shell.
func TestDockerfile(t *testing.T) {
	ins := readDockerfile(t)
	var froms []string
	for _, in := range ins {
		if in.Cmd == "FROM" {
			froms = append(froms, in.Args)
		}
		if in.Cmd == "ADD" {
			t.Errorf("ADD %s: use COPY (ADD fetches URLs and unpacks archives)", in.Args)
		}
	}
	if len(froms) < 2 {
		t.Fatalf("FROM %v: want a multi-stage build", froms)
	}
	if !strings.HasPrefix(froms[0], "--platform=$BUILDPLATFORM golang:") {
		t.Errorf("build stage FROM %s: want golang on $BUILDPLATFORM (cross-compiling, no emulation)", froms[0])
	}
	final := finalStage(ins)
	base := strings.Fields(final[0].Args)[0]
	if base != "scratch" && !strings.HasPrefix(base, "gcr.io/distroless/static") {
		t.Errorf("runtime base %s is neither distroless/static nor scratch", base)
	}
	var user, entrypoint, cmd []string
	var exposed []string
	var copied bool
	for _, in := range final[1:] {
		switch in.Cmd {
		case "USER":
			user = strings.Split(in.Args, ":")
		case "ENTRYPOINT":
			entrypoint = jsonArray(t, in)
		case "CMD":
			cmd = jsonArray(t, in)
		case "EXPOSE":
			exposed = append(exposed, strings.Fields(in.Args)...)
		case "COPY":
			copied = copied || strings.HasSuffix(in.Args, " /credproxy")
		case "RUN":
			t.Errorf("RUN %s in the runtime stage: it has no shell", in.Args)
		}
	}
	if len(user) == 0 || user[0] == "0" || user[0] == "root" || !regexp.MustCompile(`^[1-9][0-9]*$`).MatchString(user[0]) {
		t.Errorf("USER %v: want a numeric non-root UID (runAsNonRoot can verify only a number)", user)
	}
	if len(user) == 2 && user[1] == "0" {
		t.Errorf("USER %v: group root", user)
	}
	if strings.Join(entrypoint, " ") != "/credproxy" {
		t.Errorf("ENTRYPOINT %q, want [\"/credproxy\"]", entrypoint)
	}
	if strings.Join(cmd, " ") != "run --config /etc/credproxy/credproxy.yaml" {
		t.Errorf("CMD %q, want [\"run\", \"--config\", \"/etc/credproxy/credproxy.yaml\"]", cmd)
	}
	if !copied {
		t.Error("the runtime stage copies no binary to /credproxy")
	}
	for _, port := range []string{"5432", "8118", "9187"} {
		if !strings.Contains(" "+strings.Join(exposed, " ")+" ", " "+port+" ") {
			t.Errorf("EXPOSE %v lacks %s", exposed, port)
		}
	}
	dockerfileBuild(t, ins)
}

// ignoreMatch reports whether a .dockerignore pattern matches rel (a
// slash-separated path): patterns are filepath.Match globs per path element,
// "**" matching any number of elements, and a match on a directory covers
// everything under it.
func ignoreMatch(pattern, rel string) bool {
	pat := strings.Split(strings.Trim(path.Clean(pattern), "/"), "/")
	elems := strings.Split(rel, "/")
	var match func(p, e []string) bool
	match = func(p, e []string) bool {
		if len(p) == 0 {
			return true // the pattern matched a parent directory
		}
		if p[0] == "**" {
			for i := 0; i <= len(e); i++ {
				if match(p[1:], e[i:]) {
					return true
				}
			}
			return false
		}
		if len(e) == 0 {
			return false
		}
		ok, _ := path.Match(p[0], e[0])
		return ok && match(p[1:], e[1:])
	}
	return match(pat, elems)
}

func TestIgnoreMatch(t *testing.T) {
	tests := []struct {
		pattern, rel string
		want         bool
	}{
		{".git", ".git/config", true},
		{"bin", "bin/credproxy", true},
		{"bin", "cmd/bin/x", false},
		{"**/testdata", "protocols/postgres/testdata/fuzz/x", true},
		{"**/*_test.go", "config/load_test.go", true},
		{"**/*_test.go", "config/load.go", false},
		{"**/*.md", "README.md", true},
		{"deploy", "deploy/Dockerfile", true},
		{"deploy", "deployment/x.go", false},
	}
	for _, tt := range tests {
		if got := ignoreMatch(tt.pattern, tt.rel); got != tt.want {
			t.Errorf("ignoreMatch(%q, %q) = %v, want %v", tt.pattern, tt.rel, got, tt.want)
		}
	}
}

// copyBuildContext copies the repository into dst as `docker build -f
// deploy/Dockerfile .` sends it: without what Dockerfile.dockerignore excludes.
func copyBuildContext(t *testing.T, repo, dst string) {
	t.Helper()
	data, err := os.ReadFile("Dockerfile.dockerignore")
	if err != nil {
		t.Fatal(err)
	}
	var patterns []string
	for _, line := range strings.Split(string(data), "\n") {
		if line = strings.TrimSpace(line); line != "" && !strings.HasPrefix(line, "#") {
			if strings.HasPrefix(line, "!") {
				t.Fatalf("Dockerfile.dockerignore: exceptions (%s) are not supported by this test", line)
			}
			patterns = append(patterns, line)
		}
	}
	err = filepath.WalkDir(repo, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(repo, p)
		if rel == "." {
			return nil
		}
		rel = filepath.ToSlash(rel)
		for _, pat := range patterns {
			if ignoreMatch(pat, rel) {
				if d.IsDir() {
					return filepath.SkipDir
				}
				return nil
			}
		}
		target := filepath.Join(dst, rel)
		if d.IsDir() {
			return os.MkdirAll(target, 0o755)
		}
		if !d.Type().IsRegular() {
			return nil
		}
		b, err := os.ReadFile(p)
		if err != nil {
			return err
		}
		return os.WriteFile(target, b, 0o644)
	})
	if err != nil {
		t.Fatal(err)
	}
}

// TestImageBinaryIsStatic builds what the Dockerfile builds, the way it
// builds it (its go build flags, from the build context its dockerignore
// leaves), and checks the binary runs on a base with no libc: no ELF
// interpreter, no shared libraries. No container engine needed.
func TestImageBinaryIsStatic(t *testing.T) {
	if testing.Short() {
		t.Skip("builds credproxy; skipped with -short")
	}
	ldflags := strings.ReplaceAll(dockerfileBuild(t, readDockerfile(t)), "${VERSION}", "deploy-test")
	repo, err := filepath.Abs("..")
	if err != nil {
		t.Fatal(err)
	}
	ctxDir := t.TempDir()
	copyBuildContext(t, repo, ctxDir)
	bin := filepath.Join(t.TempDir(), "credproxy")
	build := exec.Command("go", "build", "-trimpath", "-ldflags", ldflags, "-o", bin, "./cmd/credproxy")
	build.Dir = ctxDir
	// GOPROXY=off: the build must need nothing that is not already in the
	// module cache (as in the Dockerfile, after go mod download).
	build.Env = append(os.Environ(), "CGO_ENABLED=0", "GOPROXY=off", "GOFLAGS=-mod=readonly -buildvcs=false")
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("go build in the image's build context: %v\n%s", err, out)
	}

	f, err := elf.Open(bin)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	for _, p := range f.Progs {
		if p.Type == elf.PT_INTERP {
			t.Error("the binary has an ELF interpreter: it is dynamically linked")
		}
	}
	if libs, err := f.ImportedLibraries(); err != nil || len(libs) > 0 {
		t.Errorf("the binary needs shared libraries %v (%v)", libs, err)
	}
	if f.Section(".symtab") != nil {
		t.Error("the binary has a symbol table: -s was not applied")
	}
	if ldd, err := exec.LookPath("ldd"); err == nil {
		out, _ := exec.Command(ldd, bin).CombinedOutput()
		if !strings.Contains(string(out), "not a dynamic executable") {
			t.Errorf("ldd %s: %s, want \"not a dynamic executable\"", bin, out)
		}
	} else {
		t.Log("no ldd on this machine; the ELF checks above stand in for it")
	}
	out, err := exec.Command(bin, "version").CombinedOutput()
	if err != nil || strings.TrimSpace(string(out)) != "credproxy deploy-test" {
		t.Errorf("credproxy version: %q, %v; want \"credproxy deploy-test\" (-X main.version)", out, err)
	}
	// The flags the manifests and the chart pass exist.
	usage, _ := exec.Command(bin, "help").CombinedOutput()
	for _, flag := range []string{"--config", "--watch", "--log-level"} {
		if !strings.Contains(string(usage), flag) {
			t.Errorf("credproxy help does not list %s, which the manifests use:\n%s", flag, usage)
		}
	}
}
